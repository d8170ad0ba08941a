from zerotune.cli import leave, main

leave(main())  # python -m zerotune: also what torchrun starts in each process
