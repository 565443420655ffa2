"""A real S3 API server on 127.0.0.1 for the tests (moto in server mode, from the ``dev`` extra)."""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Iterator

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def s3_server(bucket: str, tmp_path) -> Iterator[dict[str, str]]:
    """Serve S3 on a free local port with ``bucket`` created; yield the environment that points pyarrow (and so
    Ray and our storage helpers) at it: endpoint, dummy credentials, region, no ~/.aws files."""
    server_mod = pytest.importorskip("moto.server", reason="moto[server] (the dev extra) is not installed")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    port = _free_port()
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials")}
    try:
        s3_client(env).create_bucket(Bucket=bucket)
        yield env
    finally:
        server.stop()


def s3_keys(env: dict[str, str], bucket: str, prefix: str = "") -> set[str]:
    """Every object key under ``prefix`` in ``bucket``, read straight from the server (boto3, not our code); the
    empty ``.../`` folder markers that pyarrow creates are left out."""
    keys: set[str] = set()
    for page in s3_client(env).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys |= {o["Key"] for o in page.get("Contents", []) if not o["Key"].endswith("/")}
    return keys


def s3_client(env: dict[str, str]):
    """A boto3 S3 client of the server ``env`` (from :func:`s3_server`) points at."""
    import boto3

    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"])
