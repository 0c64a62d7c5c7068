from biofed.cli import main

main()
