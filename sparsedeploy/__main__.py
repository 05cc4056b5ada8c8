from sparsedeploy.cli import main

main()
