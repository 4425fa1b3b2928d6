from pipeline.viewer.app import main

main()
