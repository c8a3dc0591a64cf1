"""Running a recipe: the machinery around the pure step, the top layer of the package.

    cli.py        functrain run | resume | check | inspect | plot | prepare | export | sample
    build.py      recipe -> state at step 0, datasets, loaders; the trial step
    trainer.py    Trainer: the loop and its side effects (log, eval, snapshot, preemption)
    resume.py     find, check and read a snapshot, prepare the run directory
    rundir.py     run directories: recipe.yaml, metrics.jsonl, resume checks
    progress.py   the progress bar and metrics.jsonl records
    sinks.py      TensorBoard and W&B, following resumes and branches
    check.py      functrain check: does a recipe resume bitwise on this machine
    preempt.py    SIGTERM / Ctrl-C / checkpoint.signal: snapshot and exit 143
    report.py     what `inspect` prints

This package may import everything else in functrain; nothing else imports it.
"""
