from services.vision.server import main

main()
