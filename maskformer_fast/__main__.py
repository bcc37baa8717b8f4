from maskformer_fast.cli import main

main()
