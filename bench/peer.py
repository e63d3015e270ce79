"""The real Codex app-server as the peer (filled in below)."""


def compare(bench, workdir):
    return {"skipped": "not implemented yet"}
