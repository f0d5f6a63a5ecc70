"""A database URL as ``--storage``: the README's driverless ``postgresql://`` reaches the installed driver.

SQLAlchemy 2.1 reads ``postgresql://`` as psycopg 3; the ``postgres`` extra installs psycopg2. No
server is needed here: the URL's resolution is checked directly, and an unreachable server must be
one line about the storage, not an ImportError.
"""

import sys

import pytest

from fmnist_lightning.errors import ConfigError
from fmnist_lightning.studies.storage import database_url, open_storage


@pytest.fixture
def without_psycopg3(monkeypatch):
    """As where only the ``postgres`` extra is installed: psycopg (3) does not import."""
    monkeypatch.setitem(sys.modules, "psycopg", None)


def test_a_driverless_postgresql_url_uses_psycopg2_when_psycopg_is_missing(without_psycopg3):
    pytest.importorskip("psycopg2")
    assert database_url("postgresql://user@host/db") == "postgresql+psycopg2://user@host/db"
    # The password, port and query survive (the URL is rebuilt, not edited as text).
    url = database_url("postgresql://user:s%40cret@host:5433/db?sslmode=require")
    assert url == "postgresql+psycopg2://user:s%40cret@host:5433/db?sslmode=require"


@pytest.mark.parametrize(
    "url",
    ["postgresql+psycopg2://user@host/db", "postgresql+psycopg://user@host/db", "sqlite:///study.db", "mysql://u@h/db"],
)
def test_a_url_that_names_its_driver_or_another_database_is_kept(without_psycopg3, url):
    assert database_url(url) == url


def test_a_driverless_url_is_kept_when_psycopg_imports(monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", type(sys)("psycopg"))  # importable: SQLAlchemy's default works
    assert database_url("postgresql://user@host/db") == "postgresql://user@host/db"


def test_no_postgresql_driver_at_all_says_what_to_install(without_psycopg3, monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg2", None)
    with pytest.raises(ConfigError) as err:
        database_url("postgresql://user:secret@host/db")
    message = str(err.value)
    assert "\n" not in message
    assert "pip install 'fmnist_lightning[postgres]'" in message
    assert "postgresql://user:***@host/db" in message  # where, without the password


def test_an_unreachable_server_is_one_line_about_the_storage(tmp_path):
    pytest.importorskip("psycopg2")
    with pytest.raises(ConfigError) as err:
        open_storage("postgresql://nobody:secret@127.0.0.1:1/x", tmp_path, heartbeat_interval=10, grace_period=30)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("cannot open the study storage postgresql://nobody:***@127.0.0.1:1/x: ")
    assert "ImportError" not in message
    assert "secret" not in message
    assert list(tmp_path.iterdir()) == []


def test_not_a_url_at_all_is_a_config_error():
    with pytest.raises(ConfigError, match="is not a database URL"):
        database_url("postgresql://user@host:notaport/db")
