"""Training: one loop, and what it needs.

    loop.py        train_loop: the one training loop, read top to bottom
    tasks.py       the Task protocol and the tasks (supervised, causal LM, masked LM, SFT); make_task
    optim.py       optimizers and learning-rate schedules
    checkpoint.py  atomic, checksummed checkpoints; RNG states
    parallel.py    what one process of a multi-process run does at each step (Parallel)
    launch.py      joining the processes of a run (session) and starting them (launch)
    mfu.py         the device's peak FLOP/s, for model FLOPs utilisation
    runner.py      the run skeleton every training verb shares
    api.py         the train verb (from scratch);  fit.py  Keras-style fit on arrays
"""
