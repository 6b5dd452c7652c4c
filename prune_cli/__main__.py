from prune_cli.cli import main

main()
