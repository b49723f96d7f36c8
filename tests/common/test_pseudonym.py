from medseg.common.pseudonym import SECRET_ENV, project_secret, pseudonym


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


def test_threads_making_the_key_at_once_all_use_one_whole_key(tmp_path, monkeypatch):
    """Ingest pseudonymises cases on several threads: while one writes a new key, none may read it half made (an
    empty key names cases differently). Making the key is slowed here, so the others do arrive meanwhile."""
    import threading
    import time

    from medseg.common import pseudonym as module

    monkeypatch.delenv(SECRET_ENV)
    real = module.secrets.token_hex
    monkeypatch.setattr(module.secrets, "token_hex", lambda n: time.sleep(0.05) or real(n))
    path = tmp_path / ".medseg" / "pseudonym.key"
    start, keys = threading.Barrier(8), []

    def make() -> None:
        start.wait()
        keys.append(project_secret(path))

    threads = [threading.Thread(target=make) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(keys) == 8 and len(set(keys)) == 1 and len(keys[0]) == 64
    assert [p.name for p in path.parent.iterdir()] == ["pseudonym.key"]  # no temporary left
    assert (path.stat().st_mode & 0o777) == 0o600
