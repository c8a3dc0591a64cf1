"""The engine of a run: the machinery around the pure step, below the CLI (`functrain.cli`).

    build.py      recipe -> state at step 0, datasets, loaders; the trial step
    trainer.py    Trainer: the loop and its side effects (log, eval, snapshot, preemption)
    resume.py     find and read a snapshot through the one resume plan, prepare the run dir
    rundir.py     run directories: recipe.yaml, metrics.jsonl
    progress.py   the progress bar and metrics.jsonl records
    sinks.py      TensorBoard and W&B, following resumes and branches
    preempt.py    SIGTERM / Ctrl-C / checkpoint.signal: snapshot and exit 143

It may import every layer below it (checkpoint, distributed, data, recipe, the core);
only `functrain.cli` imports it.
"""
