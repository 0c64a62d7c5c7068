from biofed.apps.cli import main

main()
