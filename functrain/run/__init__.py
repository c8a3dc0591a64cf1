"""Running a recipe: the machinery around the pure step, the top layer of the package.

    cli.py        functrain run | resume | inspect | prepare
    build.py      recipe -> state at step 0, datasets, loaders; the trial step
    trainer.py    Trainer: the loop and its side effects (log, eval, snapshot, preemption)
    resume.py     find, check and read a snapshot, prepare the run directory
    rundir.py     run directories: recipe.yaml, metrics.jsonl, resume checks
    progress.py   the progress line and metrics.jsonl records
    preempt.py    SIGTERM / Ctrl-C / checkpoint.signal: snapshot and exit 143
    report.py     what `inspect` prints

This package may import everything else in functrain; nothing else imports it.
"""
