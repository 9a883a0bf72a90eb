from rcnn_cli.cli import main

main()
