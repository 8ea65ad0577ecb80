"""Tenants and their API keys: who is calling.

Keys are random and stored as SHA-256 hashes: a stolen MetaDB file yields no usable key. They
are shaped like E2B's (`e2b_` + 40 hex digits, 160 random bits) because E2B SDKs before 2.46
refuse any other shape on the client side, and hutch keys must work in them unchanged.
Authentication is a hash and a dict lookup (keys cached in memory after their first use); one
tenant never sees another's sessions because every lookup below the API is scoped by the tenant
id this returns.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import time
import uuid

from hutch.errors import AlreadyExists, InvalidArgument, NotFound, PermissionDenied, Unauthenticated
from hutch.metadb.base import MetaDB
from hutch.metadb.records import Tenant

DEFAULT_TENANT = "default"
# A new tenant's quota on the disk its hibernated sessions and memory snapshots take: about
# 150 idle code-interpreter sessions, uncompressed.
DEFAULT_IMAGE_DISK_MB = 20 * 1024


def new_api_key() -> str:
    return "e2b_" + secrets.token_hex(20)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class TenantService:
    def __init__(self, metadb: MetaDB) -> None:
        self.metadb = metadb
        self._cache: dict[str, Tenant] = {}

    async def bootstrap(self, default_key: str | None) -> str | None:
        """Create the default (admin) tenant on first start. Returns a new key to print once, or
        None when the tenant existed or `default_key` (HUTCH_API_KEY) was given."""
        # Several processes of a cluster may start together on a fresh MetaDB: whichever inserts
        # first made the tenant (and the key); the others find them made.
        try:
            await self.metadb.get_tenant(DEFAULT_TENANT)
            created = False
        except NotFound:
            try:
                await self.metadb.create_tenant(Tenant(DEFAULT_TENANT, "default", time.time(), is_admin=True))
                created = True
            except AlreadyExists:
                created = False
        if default_key:
            if await self.metadb.tenant_for_key(hash_key(default_key)) is None:
                with contextlib.suppress(AlreadyExists):
                    await self.metadb.add_api_key(DEFAULT_TENANT, hash_key(default_key), "HUTCH_API_KEY")
            return None
        if created:
            key = new_api_key()
            await self.metadb.add_api_key(DEFAULT_TENANT, hash_key(key), "bootstrap")
            return key
        return None

    async def authenticate(self, key: str | None) -> Tenant:
        """The tenant of an API key.

        Raises:
            Unauthenticated: no key, or a key nobody issued.
        """
        if not key:
            raise Unauthenticated("an API key is required (X-API-Key or Authorization: Bearer)")
        digest = hash_key(key)
        tenant = self._cache.get(digest)
        if tenant is None:
            tenant = await self.metadb.tenant_for_key(digest)
            if tenant is None:
                raise Unauthenticated("invalid API key")
            self._cache[digest] = tenant
        return tenant

    async def create(
        self,
        caller: Tenant,
        name: str,
        max_sessions: int = 50,
        max_vcpu: float | None = None,
        max_memory_mb: int | None = None,
        max_image_disk_mb: int | None = DEFAULT_IMAGE_DISK_MB,
    ) -> tuple[Tenant, str]:
        """A new tenant and its first key (admins only). Quotas: live sessions at once, the
        vCPUs and memory of all its live sessions together, and the disk its hibernated
        sessions and memory snapshots take (None: no limit)."""
        self.require_admin(caller)
        tenant = Tenant(
            f"t-{uuid.uuid4().hex[:12]}",
            name,
            time.time(),
            max_sessions=max_sessions,
            max_vcpu=max_vcpu,
            max_memory_mb=max_memory_mb,
            max_image_disk_mb=max_image_disk_mb,
        )
        await self.metadb.create_tenant(tenant)
        key = new_api_key()
        await self.metadb.add_api_key(tenant.tenant_id, hash_key(key), "initial")
        return tenant, key

    async def add_key(self, caller: Tenant, tenant_id: str, label: str) -> str:
        if caller.tenant_id != tenant_id:
            self.require_admin(caller)
        await self.metadb.get_tenant(tenant_id)
        key = new_api_key()
        await self.metadb.add_api_key(tenant_id, hash_key(key), label)
        return key

    async def update_quota(self, caller: Tenant, tenant_id: str, **quotas: float | int | None) -> Tenant:
        """Change quotas (admins only): `max_sessions`, `max_vcpu`, `max_memory_mb`,
        `max_image_disk_mb` (None: no limit for the last three). Sessions already live stay; new
        ones are checked against the new values.

        Raises:
            InvalidArgument: no quota given, an unknown one, or None for `max_sessions`.
        """
        self.require_admin(caller)
        allowed = {"max_sessions", "max_vcpu", "max_memory_mb", "max_image_disk_mb"}
        if not quotas or not set(quotas) <= allowed:
            raise InvalidArgument(f"quotas are {sorted(allowed)}")
        if quotas.get("max_sessions", 0) is None:
            raise InvalidArgument("the live-session quota cannot be lifted: give a number")
        tenant = await self.metadb.update_tenant(tenant_id, **quotas)
        self._cache = {k: (tenant if v.tenant_id == tenant_id else v) for k, v in self._cache.items()}
        return tenant

    @staticmethod
    def require_admin(caller: Tenant) -> None:
        if not caller.is_admin:
            raise PermissionDenied("only an admin tenant may do this")
