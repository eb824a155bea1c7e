from tgi_launcher.cli import main

main()
