from tgi_server.cli import main

main()
