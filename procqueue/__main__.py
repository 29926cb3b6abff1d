from procqueue._cli.main import main

main()
