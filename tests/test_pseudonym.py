from medseg.pseudonym import SECRET_ENV, project_secret, pseudonym


def test_keyed_stable_and_not_the_identifier():
    a = pseudonym("PAT-12345", key=b"k1")
    assert a == pseudonym("PAT-12345", key=b"k1")
    assert a != pseudonym("PAT-12345", key=b"k2")
    assert "12345" not in a and a.startswith("sub-")


def test_secret_file_created_once(tmp_path, monkeypatch):
    monkeypatch.delenv(SECRET_ENV)
    path = tmp_path / ".medseg" / "pseudonym.key"
    first = project_secret(path)
    assert path.is_file() and (path.stat().st_mode & 0o777) == 0o600
    assert project_secret(path) == first and len(first) == 64
