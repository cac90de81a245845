from gossiptrain.cli import main

main()
