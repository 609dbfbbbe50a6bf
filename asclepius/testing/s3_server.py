"""moto's S3 server with the limit moto does not enforce: a single CopyObject of a source above S3's 5 GiB.

    python -m asclepius.testing.s3_server --port 5000 [--copy-limit-bytes N]

Real S3 refuses CopyObject when the source object is larger than 5 GiB ("The specified copy source is larger than the
maximum allowable size for a copy source: 5368709120", InvalidRequest, HTTP 400; such objects must be copied with
multipart UploadPartCopy). moto copies any size. This server answers a CopyObject of a larger source (the limit is
configurable so a test can impose it on small files) with S3's own error, for every client — the driver, Ray
workers on any node, pyarrow and boto alike.

With IAM enforced (asclepius.testing.s3.enforce_iam), one place where moto is stricter than S3 is mended: moto
authorizes a multi-object delete (DeleteObjects) once, against the bucket's ARN, and refuses every key when that
fails; S3 checks s3:DeleteObject on each key (https://docs.aws.amazon.com/AmazonS3/latest/API/API_DeleteObjects.html),
which is what a policy scoped to a run prefix relies on (pyarrow's delete_dir and Ray Train's checkpoint clean-up send
DeleteObjects).
"""

from __future__ import annotations

import argparse
import urllib.parse

S3_COPY_LIMIT_BYTES = 5 * 1024**3  # CopyObject's documented maximum source size


class CopyLimit:
    """WSGI middleware: refuse CopyObject (PUT with x-amz-copy-source, not a part copy) of a source over `limit`."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit
        self.refused = 0

    def _source_size(self, copy_source: str) -> int | None:
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.s3.models import s3_backends

        source = urllib.parse.unquote(copy_source).lstrip("/").split("?", 1)[0]
        bucket, _, key = source.partition("/")
        for account in {DEFAULT_ACCOUNT_ID, *s3_backends.keys()}:
            try:
                obj = s3_backends[account]["aws"].get_object(bucket, key)
            except Exception:  # noqa: BLE001 — not this account's bucket
                continue
            if obj is not None:
                return obj.size
        return None

    def __call__(self, environ, start_response):
        copy_source = environ.get("HTTP_X_AMZ_COPY_SOURCE")
        query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
        if environ.get("REQUEST_METHOD") == "PUT" and copy_source and "partNumber" not in query:
            size = self._source_size(copy_source)
            if size is not None and size > self.limit:
                self.refused += 1
                body = (
                    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InvalidRequest</Code><Message>The specified copy '
                    f"source is larger than the maximum allowable size for a copy source: {self.limit}</Message></Error>"
                ).encode()
                start_response("400 Bad Request", [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
                return [body]
        return self.app(environ, start_response)


def authorize_multi_delete_per_key() -> None:
    """Make moto's DeleteObjects authorize s3:DeleteObject per key, as S3 does (see the module's docstring)."""
    import xmltodict
    from moto.s3.responses import S3Response

    original = S3Response._bucket_response_delete_keys

    def per_key(self, bucket_name: str, authenticated: bool = True):
        if authenticated:  # the bucket-wide check passed: moto's own path (bucket policy per key) is right
            return original(self, bucket_name, authenticated)
        body = xmltodict.parse(self.body, strip_whitespace=False)
        objects = body["Delete"].get("Object", [])
        objects = objects if isinstance(objects, list) else [objects]
        allowed, denied = [], []
        for obj in objects:
            try:
                self._authenticate_and_authorize_s3_action(bucket_name=bucket_name, key_name=obj["Key"])
                allowed.append(obj)
            except Exception:  # noqa: BLE001 — moto's AccessDenied errors: S3 reports them per key
                denied.append(obj["Key"])
        if not allowed:
            return original(self, bucket_name, False)
        body["Delete"]["Object"] = allowed
        self.body = xmltodict.unparse(body).encode()
        status, headers, payload = original(self, bucket_name, True)
        if denied:  # add S3's per-key error entries for what this principal may not delete
            errors = "".join(f"<Error><Key>{k}</Key><Code>AccessDenied</Code><Message>Access Denied</Message></Error>" for k in denied)
            text = payload.decode() if isinstance(payload, bytes) else payload
            payload = text.replace("</DeleteResult>", errors + "</DeleteResult>")
        return status, headers, payload

    S3Response._bucket_response_delete_keys = per_key


def main() -> None:
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import run_simple

    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--copy-limit-bytes", type=int, default=S3_COPY_LIMIT_BYTES)
    args = parser.parse_args()
    authorize_multi_delete_per_key()
    app = CopyLimit(DomainDispatcherApplication(create_backend_app), args.copy_limit_bytes)
    run_simple(args.host, args.port, app, threaded=True, request_handler=MotoRequestHandler)


if __name__ == "__main__":
    main()
