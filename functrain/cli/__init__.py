"""The `functrain` command and its tools: the top layer, which nothing else imports.

    main.py      argparse: run | resume | check | inspect | plot | prepare | export | sample
    check.py     functrain check: does a recipe resume bitwise on this machine
    report.py    what `inspect` prints
    plot.py      loss, eval loss, LR and throughput of runs as a PNG
    sample.py    text from a language-model snapshot
    export.py    a snapshot's weights as safetensors
    rebuild.py   which model a snapshot may rebuild: functrain's own, --recipe, --trust-recipe

It drives the engine (`functrain.run`) and reads snapshots (`functrain.checkpoint`).
"""

from functrain.cli.main import console, main

__all__ = ["console", "main"]
