"""rcnn_cli: R-CNN-style object detection from the command line."""
__version__ = "0.1.0"
