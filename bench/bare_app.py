"""The read-path benchmark's reference: a bare FastAPI endpoint that reads one row of the same database.

No authentication, no rate limit, no ORM objects, no response model: what any FastAPI + SQLAlchemy service pays
for one indexed read, served by the same uvicorn as the API. Run as `uvicorn bench.bare_app:app` with
BARE_DATABASE_URL set to the API's database.
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import FastAPI, HTTPException
from sqlalchemy import create_engine, text

from app.db import normalise_url

engine = create_engine(normalise_url(os.environ["BARE_DATABASE_URL"]), pool_size=10, max_overflow=20)
app = FastAPI()
ROW = text("SELECT id, status, progress, stage, created_at, started_at, finished_at FROM jobs WHERE id = :id")


@app.get("/row/{job_id}")
def read_row(job_id: str) -> dict[str, Any]:
    with engine.connect() as connection:
        row = connection.execute(ROW, {"id": job_id}).mappings().first()
    if row is None:
        raise HTTPException(404)
    return dict(row)
