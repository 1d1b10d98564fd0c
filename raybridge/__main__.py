from raybridge.cli import main

main()
