"""A real S3-compatible server on loopback for the team-cache tests and `bench remote`.

moto's server (PyPI `moto[server]`): the S3 REST API over HTTP, objects kept in memory, with
conditional writes (If-None-Match) and multipart uploads. Not a fake of our client: it is the
same wire protocol AWS speaks, driven by the same `object_store` code a user runs.

usage: python3 s3_server.py PORT BUCKET [BUCKET…]
Prints `ready http://127.0.0.1:PORT` once the buckets exist, then serves until killed.
"""

import sys
import time

import boto3
from moto.server import ThreadedMotoServer


def main() -> None:
    port = int(sys.argv[1])
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    for bucket in sys.argv[2:]:
        s3.create_bucket(Bucket=bucket)
    print(f"ready {endpoint}", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
