from experiments.train import main

main()
