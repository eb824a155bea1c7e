from tgi_router.cli import main

main()
