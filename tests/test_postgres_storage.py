"""A sweep's Optuna storage on a real PostgreSQL server (tests/postgres_server.py; Debian's ``postgresql``):
the URL works, and a bad one fails at once with an error that names the URL without its password.

Skipped where PostgreSQL is not installed, unless ``SGEXP_REQUIRE_POSTGRES=1`` (.ci/run installs it and sets it).
"""

from __future__ import annotations

import importlib.util
import os

import optuna
import pytest
import sqlalchemy
from conftest import free_port
from postgres_server import missing, postgres_server

from sgexp.sweeps.storage import open_storage, shown_url

REASON = missing()
if REASON and os.environ.get("SGEXP_REQUIRE_POSTGRES") == "1":
    raise RuntimeError(f"SGEXP_REQUIRE_POSTGRES=1: {REASON}")
needs_server = pytest.mark.skipif(REASON is not None, reason=REASON or "")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with postgres_server(tmp_path_factory.mktemp("pg") / "server", databases=("optuna",)) as pg:
        yield pg


def test_unreachable_server_is_named_without_its_password():
    url = f"postgresql+psycopg2://sgexp:s3cret-pw@127.0.0.1:{free_port()}/optuna"
    with pytest.raises(ValueError) as err:
        open_storage(url)
    message = str(err.value)
    assert shown_url(url) == url.replace("s3cret-pw", "***") and shown_url("runs/x.log") == "runs/x.log"
    assert f"storage={shown_url(url)!r} is invalid" in message and "Connection refused" in message, message
    assert "s3cret-pw" not in message


@pytest.mark.skipif(importlib.util.find_spec("psycopg") is not None, reason="psycopg 3 is installed")
def test_plain_postgresql_url_without_its_driver_says_what_to_install():
    """SQLAlchemy 2.1 reads plain ``postgresql://`` as psycopg 3; sgexp's dev extra has psycopg2."""
    with pytest.raises(ValueError, match=r"psycopg2-binary and write postgresql\+psycopg2://") as err:
        open_storage("postgresql://sgexp:s3cret-pw@127.0.0.1:5432/optuna")
    assert "s3cret-pw" not in str(err.value)


@needs_server
def test_wrong_password_and_unknown_database_are_the_servers_words(server):
    wrong = server.url("optuna").replace(server.password, "not-it")
    with pytest.raises(ValueError, match="password authentication failed") as err:
        open_storage(wrong)
    assert "not-it" not in str(err.value) and ":***@" in str(err.value)
    with pytest.raises(ValueError, match='database "nowhere" does not exist'):
        open_storage(server.url("nowhere"))


@needs_server
def test_a_study_on_postgresql_is_in_its_tables(server):
    storage = open_storage(server.url("optuna"))
    study = optuna.create_study(study_name="pg", storage=storage, directions=["minimize", "minimize"])
    study.optimize(lambda t: (t.suggest_float("x", 0, 1), t.suggest_float("y", 0, 1)), n_trials=3)
    engine = sqlalchemy.create_engine(server.url("optuna"))
    try:
        with engine.connect() as db:
            done = db.execute(
                sqlalchemy.text(
                    "SELECT count(*) FROM trials JOIN studies USING (study_id)"
                    " WHERE study_name = 'pg' AND trials.state = 'COMPLETE'"
                )
            ).scalar()
    finally:
        engine.dispose()
    assert done == 3
