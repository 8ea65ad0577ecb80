"""Configuration of `hutch serve`: defaults, then a TOML file, then command-line flags.

# /etc/hutch.toml (every key optional)
host = "0.0.0.0"
port = 3000
data_dir = "/var/lib/hutch"
metadb_url = "sqlite://"          # sqlite:///path, or the data dir's metadb.sqlite3
workspace_store = "auto"          # image | directory | auto (image where loop devices exist)
max_instances = 256
domain = ""                       # E2B host routing: {port}-{sandboxId}.{domain}
[warm_pools]                      # override the built-in functions' pool sizes
base = 2
"code-interpreter-v1" = 1
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from hutch.errors import InvalidArgument


class ServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(3000, ge=1, le=65535)
    data_dir: Path = Path("/var/lib/hutch")
    metadb_url: str = "sqlite://"
    workspace_store: str = Field("auto", pattern="^(auto|image|directory)$")
    max_instances: int = Field(256, ge=1)
    uid_base: int = Field(1_000_000_000, ge=65536)
    domain: str = ""
    warm_pools: dict[str, int] = Field(default_factory=dict)
    reap_interval: float = Field(0.5, gt=0)

    @classmethod
    def load(cls, path: Path | None = None, **overrides) -> ServerConfig:
        values: dict = {}
        if path is not None:
            try:
                values = tomllib.loads(Path(path).read_text())
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise InvalidArgument(f"cannot read config {path}: {exc}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(values)
