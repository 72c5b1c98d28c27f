"""The intake baseline: a bare FastAPI app served by uvicorn with the same settings as needle's
intake (one worker, ``log_level="warning"``, ``access_log=False``, ``lifespan="off"``).

* ``GET /hello`` -> ``{"hello": "world"}``: the ceiling of FastAPI + uvicorn on this machine.
* ``POST /echo`` -> 201: parses and validates a small JSON body with pydantic, the fairer
  baseline for a POST (same body as a report, no auth, no event store).

Run: ``python -m services.bench.baseline_app --port 8001 [--workers N]``."""
from __future__ import annotations

import argparse

from fastapi import FastAPI, Response
from pydantic import BaseModel, ConfigDict, Field


class EchoBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grid: str = Field(min_length=1, max_length=64)
    category: str = Field(min_length=1, max_length=64)
    title: str = Field(min_length=1, max_length=200)


def create_app() -> FastAPI:
    app = FastAPI(title="needle-bench-baseline", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/hello")
    async def hello() -> dict[str, str]:
        return {"hello": "world"}

    @app.post("/echo", status_code=201)
    async def echo(body: EchoBody) -> Response:
        return Response(body.model_dump_json(), status_code=201, media_type="application/json")

    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    args = parser.parse_args(argv)
    if args.workers > 1:  # uvicorn's own multi-process mode needs the app as an import string
        uvicorn.run("services.bench.baseline_app:create_app", factory=True, workers=args.workers, host=args.host,
                    port=args.port, log_level="warning", access_log=False, lifespan="off")
        return
    uvicorn.run(create_app(), host=args.host, port=args.port, log_level="warning", access_log=False,
                lifespan="off")


if __name__ == "__main__":  # pragma: no cover
    main()
