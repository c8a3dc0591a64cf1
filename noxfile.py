"""Test and lint sessions: `nox` runs both, `nox -s tests` only the tests."""

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    session.install(
        "-c", "constraints.txt", "-e", ".[test,tokenizers,safetensors,tensorboard,wandb,plot,hf]"
    )
    session.run("pytest", "-q", *session.posargs)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    session.install("ruff")
    # `.`, not a list of folders: pyproject.toml's exclude decides, and tests/test_layers.py
    # checks that it leaves out no tracked Python file.
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
