"""CloudChat: accounts, cookie sessions and a health check for small websites, in one file.

Run it:
    python cloudchat.py               serve on HOST:PORT (default 127.0.0.1:5000)
    python cloudchat.py initdb        create or update the tables (idempotent)
    python cloudchat.py --help

Embed it: ``cloudchat.app`` is a WSGI callable built from the environment on its first
request (``gunicorn -k gevent cloudchat:app``); ``create_app(Config(...))`` builds one from
an explicit configuration. Importing this module patches nothing and connects to nothing.

Storage: with no configuration at all, an SQLite file and an in-process key-value store
(one process only). In production, PostgreSQL (PgBouncer in transaction mode is fine: no
session state, no server-side prepared statements) and Redis. All settings come from
environment variables; config.example.env documents each one.

Threat model: the server sits behind a reverse proxy on a small shared box and faces the
open internet. Passwords are hashed with Argon2id off the event loop; session ids are 256
random bits and only their SHA-256 is stored; login failures look the same in wording and
timing whether or not the account exists; rate limits key on the address the socket peer
or a trusted proxy reports, never on one the client writes itself; answers never carry a
traceback; passwords, tokens and cookies never reach the log. Two-factor secrets are
stored as authenticator apps need them, with the database as the trust boundary (README:
"How it keeps accounts safe"); a code works once.
"""

if __name__ == "__main__":
    # Run as a script (`python cloudchat.py`), this file starts again as an import of
    # itself: Python compiled the whole file to run it, and the compiler's memory (14 MB of
    # a 64 MB start) would stay with the process, where an import reads the cached bytecode.
    # The new process patches gevent before anything imports socket, ssl or threading and
    # runs main(). `python -m cloudchat` reads the bytecode already and goes on here, as
    # does a start with PYTHONDONTWRITEBYTECODE; a plain import (embedding servers, tests)
    # patches nothing.
    import os as _os
    import sys as _sys

    _where, _file = _os.path.split(_os.path.abspath(__file__))
    # Not with PYTHONDONTWRITEBYTECODE (the import would compile again), nor for a file
    # that cannot be imported by its name.
    if __spec__ is None and not _sys.dont_write_bytecode and _file.endswith(".py"):
        _options = _sys.orig_argv[1 : len(_sys.orig_argv) - len(_sys.argv)]  # -X dev, say
        _restart = (
            "import importlib, sys; where, name = sys.argv.pop(1), sys.argv.pop(1);"
            " sys.path.insert(0, where); from gevent import monkey; monkey.patch_all();"
            " sys.exit(importlib.import_module(name).main())"
        )
        _argv = [_sys.executable, *_options, "-c", _restart, _where, _file[:-3]]
        try:
            _os.execv(_sys.executable, [*_argv, *_sys.argv[1:]])
        except OSError:
            pass  # no exec here: serve from this copy
    from gevent import monkey

    monkey.patch_all()

import argparse
import base64
import contextlib
import ctypes
import dataclasses
import datetime as dt
import email.message
import email.utils
import functools
import gc
import hashlib
import hmac
import http.client
import ipaddress
import itertools
import json
import logging
import math
import os
import random
import re
import resource
import secrets
import select
import signal
import smtplib
import socket
import sqlite3
import ssl
import sys
import threading
import time
import urllib.parse
import uuid
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple, TextIO

import argon2
import bottle
import gevent
import gevent.event
import gevent.monkey
import gevent.pool
import gevent.pywsgi
import gevent.socket
import psycopg2
import psycopg2.errorcodes
import psycopg2.extensions
import redis
import redis.backoff
import redis.retry
import redis.sentinel

__version__ = "0.1.0"

log = logging.getLogger("cloudchat")

# poll() as the kernel offers it, unpatched: used with a zero timeout only. (Not select():
# it refuses descriptors above 1023, which a busy server with LimitNOFILE=8192 hands out.)
_real_poll = gevent.monkey.get_original("select", "poll")


###############################################################################
# Config
###############################################################################


class ConfigError(Exception):
    """A setting is malformed; the message names the variable and the fix."""


class UnsafeConfigError(ConfigError):
    """A setting is well-formed but unsafe for CLOUDCHAT_ENV=production."""


@dataclasses.dataclass(frozen=True)
class RateLimit:
    """At most `limit` attempts per `window` seconds."""

    limit: int
    window: int


DEFAULT_TRUSTED_PROXIES = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128"))

# Model providers behind OpenAI-compatible chat-completions APIs: name -> (environment
# prefix, default base URL, default model). DeepSeek retired deepseek-chat and
# deepseek-reasoner on 2026-07-24; deepseek-v4-flash thinks unless told not to.
PROVIDER_DEFAULTS = {
    "deepseek": ("DEEPSEEK", "https://api.deepseek.com", "deepseek-v4-flash"),
    "openai": ("OPENAI", "https://api.openai.com/v1", "gpt-4o-mini"),
    "dashscope": (
        "DASHSCOPE",
        "https://dashscope.aliyuncs.com/compatible-mode/v1",
        "qwen-plus",
    ),
}
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."


@dataclasses.dataclass(frozen=True)
class ProviderConfig:
    """One model provider: where to send chat completions, with which key and model."""

    name: str
    base_url: str
    model: str
    api_key: str = dataclasses.field(default="", repr=False)


# Argon2id for a 1 GB box: OWASP's first recommended setting (m = 19 MiB, t = 2, p = 1),
# the memory-light end of RFC 9106's trade-off. Two hashes at once cost 38 MiB at the peak.
ARGON2_DEFAULT_TIME_COST = 2
ARGON2_DEFAULT_MEMORY_KIB = 19456
ARGON2_DEFAULT_PARALLELISM = 1
# A key that signs cookies must resist guessing offline: at least 128 bits of hex.
SECRET_KEY_MIN = 32


def _setting(env: str, default: Any, kind: str = "text", *args: Any, **meta: Any) -> Any:
    """A Config field, declared once: its default, the variable it is read from and how (the
    _EnvReader method `kind`, with `args` such as bounds). secret=True keeps it out of repr;
    fallback="field" takes that field's value when the variable is unset."""
    return dataclasses.field(
        default=default,
        repr=not meta.get("secret", False),
        metadata={"env": env, "kind": kind, "args": args, "fallback": meta.get("fallback", "")},
    )


MB = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting of the server, each declared once (default, variable, parser, bounds);
    `Config()` is what an empty environment gives, read once by `from_env`."""

    env: str = _setting("CLOUDCHAT_ENV", "development", "choice", ("development", "production"))
    host: str = _setting("HOST", "127.0.0.1")
    port: int = _setting("PORT", 5000, "integer", 0, 65535)
    database_url: str = _setting("DATABASE_URL", "", secret=True)
    db_path: str = _setting("CLOUDCHAT_DB_PATH", "cloudchat.db")
    db_pool_size: int = _setting("DB_POOL_SIZE", 4, "integer", 1, 100)
    db_timeout: float = _setting("DB_TIMEOUT", 3.0, "number", 0.1, 120)
    redis_url: str = _setting("REDIS_URL", "", "redis_url", secret=True)
    redis_timeout: float = _setting("REDIS_TIMEOUT", 1.0, "number", 0.05, 60)
    redis_pool_size: int = _setting("REDIS_POOL_SIZE", 64, "integer", 1, 1000)
    redis_key_prefix: str = _setting("REDIS_KEY_PREFIX", "cc:")
    redis_ca_file: str = _setting("REDIS_CA_FILE", "")
    redis_sentinels: tuple[tuple[str, int], ...] = _setting(
        "REDIS_SENTINELS", (), "hostports", 26379
    )
    redis_sentinel_master: str = _setting("REDIS_SENTINEL_MASTER", "mymaster")
    redis_sentinel_password: str = _setting("REDIS_SENTINEL_PASSWORD", "", "secret", secret=True)
    allow_plaintext_stores: bool = _setting("ALLOW_PLAINTEXT_STORES", False, "flag")
    auth_cookie_name: str = _setting("AUTH_COOKIE_NAME", "cc_auth")
    app_session_cookie_name: str = _setting("APP_SESSION_COOKIE_NAME", "cc_app")
    cookie_secure: bool = _setting("COOKIE_SECURE", False, "flag")
    session_ttl: int = _setting("SESSION_TTL_SECONDS", 604800, "integer", 60, 31536000)
    session_cache_seconds: int = _setting("SESSION_CACHE_SECONDS", 60, "integer", 1, 86400)
    session_idle_seconds: int = _setting("SESSION_IDLE_SECONDS", 259200, "integer", 60, 31536000)
    session_max_per_user: int = _setting("SESSION_MAX_PER_USER", 20, "integer", 1, 1000)
    trusted_proxies: tuple[Any, ...] = _setting(
        "TRUSTED_PROXIES", DEFAULT_TRUSTED_PROXIES, "networks"
    )
    ipv6_prefix_length: int = _setting("IPV6_PREFIX_LENGTH", 64, "integer", 32, 128)
    secret_key: str = _setting("SECRET_KEY", "", secret=True)
    max_body_bytes: int = _setting("MAX_BODY_BYTES", 65536, "integer", 1024, 16 * MB)
    argon2_time_cost: int = _setting(
        "ARGON2_TIME_COST", ARGON2_DEFAULT_TIME_COST, "integer", 1, 100
    )
    argon2_memory_kib: int = _setting(
        "ARGON2_MEMORY_KIB", ARGON2_DEFAULT_MEMORY_KIB, "integer", 8, 4 * MB
    )
    argon2_parallelism: int = _setting(
        "ARGON2_PARALLELISM", ARGON2_DEFAULT_PARALLELISM, "integer", 1, 64
    )
    argon2_max_concurrency: int = _setting("ARGON2_MAX_CONCURRENCY", 2, "integer", 1, 64)
    argon2_max_queue: int = _setting("ARGON2_MAX_QUEUE", 16, "integer", 0, 10_000)
    password_require_mix: bool = _setting("PASSWORD_REQUIRE_MIX", False, "flag")
    password_blocklist_file: str = _setting("PASSWORD_BLOCKLIST_FILE", "")
    rate_register_ip: RateLimit = _setting("RATE_REGISTER_IP", RateLimit(10, 3600), "rate")
    rate_register_email: RateLimit = _setting("RATE_REGISTER_EMAIL", RateLimit(3, 3600), "rate")
    rate_login_ip: RateLimit = _setting("RATE_LOGIN_IP", RateLimit(10, 600), "rate")
    rate_login_identifier: RateLimit = _setting("RATE_LOGIN_IDENTIFIER", RateLimit(10, 600), "rate")
    rate_forgot_ip: RateLimit = _setting("RATE_FORGOT_IP", RateLimit(20, 3600), "rate")
    rate_forgot_identifier: RateLimit = _setting(
        "RATE_FORGOT_IDENTIFIER", RateLimit(5, 3600), "rate"
    )
    rate_account: RateLimit = _setting("RATE_ACCOUNT", RateLimit(60, 60), "rate")
    rate_token_ip: RateLimit = _setting("RATE_TOKEN_IP", RateLimit(30, 600), "rate")
    rate_profile: RateLimit = _setting("RATE_PROFILE", RateLimit(20, 3600), "rate")
    site_name: str = _setting("SITE_NAME", "CloudChat")
    frontend_base_url: str = _setting("FRONTEND_BASE_URL", "http://localhost:5000", "url")
    allowed_origins: tuple[str, ...] = _setting("ALLOWED_ORIGINS", (), "origins")
    pwreset_token_ttl: int = _setting("PWRESET_TOKEN_TTL", 900, "integer", 60, 86400)
    pwreset_revoke_sessions: bool = _setting("PWRESET_REVOKE_SESSIONS", True, "flag")
    email_verification: str = _setting(
        "EMAIL_VERIFICATION", "off", "choice", ("off", "optional", "required")
    )
    email_token_ttl: int = _setting("EMAIL_TOKEN_TTL", 86400, "integer", 300, 30 * 86400)
    audit_retention_days: int = _setting("AUDIT_RETENTION_DAYS", 90, "integer", 1, 36500)
    cleanup_interval: int = _setting("CLEANUP_INTERVAL_SECONDS", 3600, "integer", 0, 7 * 86400)
    smtp_host: str = _setting("SMTP_HOST", "")
    smtp_port: int = _setting("SMTP_PORT", 587, "integer", 1, 65535)
    smtp_user: str = _setting("SMTP_USER", "")
    smtp_pass: str = _setting("SMTP_PASS", "", "secret", secret=True)
    smtp_tls: bool = _setting("SMTP_TLS", True, "flag")
    smtp_ca_file: str = _setting("SMTP_CA_FILE", "")
    smtp_timeout: float = _setting("SMTP_TIMEOUT", 10.0, "number", 0.5, 300)
    mail_from: str = _setting("MAIL_FROM", "no-reply@localhost")
    mail_sender_name: str = _setting("MAIL_SENDER_NAME", "CloudChat", fallback="site_name")
    mail_retries: int = _setting("MAIL_RETRIES", 2, "integer", 0, 10)
    chat_providers: tuple[ProviderConfig, ...] = _setting("CHAT_PROVIDER", (), "providers")
    chat_thinking: bool = _setting("CHAT_THINKING", False, "flag")
    chat_connect_timeout: float = _setting("CHAT_CONNECT_TIMEOUT", 5.0, "number", 0.1, 120)
    chat_read_timeout: float = _setting("CHAT_READ_TIMEOUT", 60.0, "number", 0.1, 3600)
    chat_max_tokens: int = _setting("CHAT_MAX_TOKENS", 1024, "integer", 1, 1_000_000)
    chat_temperature: float = _setting("CHAT_TEMPERATURE", 0.7, "number", 0, 2)
    system_prompt: str = _setting("SYSTEM_PROMPT", DEFAULT_SYSTEM_PROMPT, "prompt")
    max_history: int = _setting("MAX_HISTORY", 6, "integer", 0, 100)
    chat_max_chars: int = _setting("CHAT_MAX_CHARS", 4000, "integer", 1, 1_000_000)
    chat_max_reply_chars: int = _setting("CHAT_MAX_REPLY_CHARS", 32000, "integer", 100, 10_000_000)
    chat_busy_streams: int = _setting("CHAT_BUSY_STREAMS", 100, "integer", 0, 1_000_000)
    chat_pool_idle_seconds: float = _setting("CHAT_POOL_IDLE_SECONDS", 60.0, "number", 1, 3600)
    chat_pool_max_idle: int = _setting("CHAT_POOL_MAX_IDLE", 1000, "integer", 0, 100_000)
    chat_history_ttl: int = _setting("CHAT_HISTORY_TTL", 3600, "integer", 60, 30 * 86400)
    chat_require_auth: bool = _setting("CHAT_REQUIRE_AUTH", False, "flag")
    rate_chat_visitor: RateLimit = _setting("RATE_CHAT_VISITOR", RateLimit(20, 60), "rate")
    rate_chat_ip: RateLimit = _setting("RATE_CHAT_IP", RateLimit(60, 60), "rate")
    rate_visitor_ids_ip: RateLimit = _setting("RATE_VISITOR_IDS_IP", RateLimit(60, 3600), "rate")
    chat_history_max_bytes: int = _setting(
        "CHAT_HISTORY_MAX_BYTES", 65536, "integer", 1024, 16 * MB
    )
    chat_history_budget_mb: int = _setting("CHAT_HISTORY_BUDGET_MB", 16, "integer", 1, 1_000_000)
    chat_daily_tokens: int = _setting("CHAT_DAILY_TOKENS", 0, "integer", 0, 10**12)
    chat_daily_tokens_user: int = _setting("CHAT_DAILY_TOKENS_USER", 0, "integer", 0, 10**12)
    chat_daily_tokens_anon: int = _setting("CHAT_DAILY_TOKENS_ANON", 0, "integer", 0, 10**12)
    debug_return_reset_token: bool = _setting("DEBUG_RETURN_RESET_TOKEN", False, "flag")
    health_timeout: float = _setting("HEALTH_TIMEOUT", 2.0, "number", 0.1, 60)
    client_timeout: float = _setting("CLIENT_TIMEOUT", 30.0, "number", 1, 3600)
    header_timeout: float = _setting("HEADER_TIMEOUT", 10.0, "number", 0.5, 600)
    body_timeout: float = _setting("BODY_TIMEOUT", 20.0, "number", 0.5, 600)
    max_connections: int = _setting("MAX_CONNECTIONS", 0, "integer", 0, 1_000_000)
    shutdown_grace: float = _setting("SHUTDOWN_GRACE_SECONDS", 10.0, "number", 0, 600)
    log_level: str = _setting(
        "LOG_LEVEL", "INFO", "choice", ("DEBUG", "INFO", "WARNING", "ERROR"), True
    )
    log_format: str = _setting("LOG_FORMAT", "text", "choice", ("text", "json"))
    demo_page: str = _setting("DEMO_PAGE", "auto", "choice", ("auto", "0", "1"))
    metrics_token: str = _setting("METRICS_TOKEN", "", secret=True)

    @property
    def production(self) -> bool:
        """True when CLOUDCHAT_ENV=production."""
        return self.env == "production"

    @property
    def uses_redis(self) -> bool:
        """Whether the key-value store is Redis (REDIS_URL or REDIS_SENTINELS)."""
        return bool(self.redis_url or self.redis_sentinels)

    @property
    def serves_demo_page(self) -> bool:
        """DEMO_PAGE=1, or (auto, the default) in development."""
        return self.demo_page == "1" or (self.demo_page == "auto" and not self.production)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> "Config":
        """Build the configuration from environment variables; ConfigError naming every
        malformed setting, or UnsafeConfigError naming every unsafe one in production."""
        cfg, problems, unsafe = cls.examine_env(environ)
        if problems:
            raise ConfigError("; ".join(problems))
        if unsafe:
            raise UnsafeConfigError("; ".join(unsafe))
        return cfg

    @classmethod
    def _read_fields(cls, read: "_EnvReader") -> dict[str, Any]:
        """Every field's value, read as its declaration says."""
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            meta = field.metadata
            default = values[meta["fallback"]] if meta["fallback"] else field.default
            values[field.name] = getattr(read, meta["kind"])(meta["env"], default, *meta["args"])
        return values

    @classmethod
    def variable_names(cls) -> set[str]:
        """Every environment variable the configuration reads."""
        read = _EnvReader({})
        cls._read_fields(read)
        return read.read

    @classmethod
    def examine_env(cls, environ: Mapping[str, str]) -> tuple["Config", list[str], list[str]]:
        """The configuration (defaults where a value is malformed), every malformed
        setting, and in production every unsafe one, each as 'cause (fix)'."""
        read = _EnvReader(environ)
        cfg = cls(**cls._read_fields(read))
        problems = read.problems + setting_problems(cfg)
        unsafe = []
        if cfg.production:
            unsafe = production_problems(cfg) + [
                f"{name} still holds a CHANGE_ME placeholder (put the real value in)"
                for name in sorted(read.read)
                if "CHANGE_ME" in environ.get(name, "")
            ]
        return cfg, problems, unsafe


def setting_problems(cfg: Config) -> list[str]:
    """Settings that are well-formed one by one but cannot work, as 'cause (fix)'."""
    problems = []
    if cfg.argon2_memory_kib < 8 * cfg.argon2_parallelism:
        problems.append(
            "ARGON2_MEMORY_KIB must be at least 8 x ARGON2_PARALLELISM (raise it or lower the"
            " parallelism)"
        )
    if cfg.redis_ca_file and not cfg.redis_url.startswith("rediss://"):
        problems.append(
            "REDIS_CA_FILE is set but REDIS_URL is not rediss:// (use rediss://, or unset the"
            " CA file)"
        )
    if cfg.metrics_token and len(cfg.metrics_token) < SECRET_KEY_MIN:
        problems.append(
            f"METRICS_TOKEN is shorter than {SECRET_KEY_MIN} characters (make one with"
            " `python -c 'import secrets; print(secrets.token_hex(32))'`)"
        )
    if cfg.secret_key and len(cfg.secret_key) < SECRET_KEY_MIN:
        problems.append(
            f"SECRET_KEY is shorter than {SECRET_KEY_MIN} characters (make one with"
            " `python -c 'import secrets; print(secrets.token_hex(32))'`)"
        )
    for name, path, what in (
        ("PASSWORD_BLOCKLIST_FILE", cfg.password_blocklist_file, "a file of one password a line"),
        ("SMTP_CA_FILE", cfg.smtp_ca_file, "the PEM file of the relay's CA"),
        ("REDIS_CA_FILE", cfg.redis_ca_file, "the PEM file of the Redis server's CA"),
    ):
        if path and not (os.path.isfile(path) and os.access(path, os.R_OK)):
            problems.append(f"{name}={path!r} cannot be read (point it at {what}, or unset it)")
    dsn = cfg.database_url
    if dsn and not (dsn.startswith(("postgresql://", "postgres://")) or "=" in dsn):
        problems.append(
            f"DATABASE_URL={redact_url(dsn)!r} is not PostgreSQL (use postgresql://user:password"
            "@host:port/db, or unset it for SQLite)"
        )
    if cfg.redis_url and not cfg.redis_url.startswith(("redis://", "rediss://", "unix://")):
        problems.append(
            f"REDIS_URL={redact_url(cfg.redis_url)!r} is not a Redis URL (use"
            " redis://:password@host:6379/0, rediss:// for TLS, or unix:///path)"
        )
    folder = os.path.dirname(os.path.abspath(cfg.db_path))
    if not cfg.database_url and not os.path.isdir(folder):
        problems.append(
            f"CLOUDCHAT_DB_PATH={cfg.db_path!r}: the folder {folder} does not exist (create it,"
            " or point the setting into an existing one)"
        )
    try:
        listen_addresses(cfg.host)
    except OSError as exc:
        problems.append(
            f"HOST={cfg.host!r} does not resolve ({exc.strerror or exc}); use an address such as"
            " 127.0.0.1"
        )
    return problems


def listen_addresses(host: str) -> list[Any]:
    """The addresses HOST means, as the operating system reads it ('0' is 0.0.0.0 too)."""
    infos = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]


_URL_USERINFO_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^\s/]*@")


def redact_url(text: str) -> str:
    """Text with the user and password of every URL in it replaced by '***'."""
    return _URL_USERINFO_RE.sub(r"\1***@", text)


def plaintext_store_problems(cfg: Config) -> list[str]:
    """PostgreSQL or Redis reached over another machine's network without TLS, unless
    ALLOW_PLAINTEXT_STORES=1 says that network is private."""
    if cfg.allow_plaintext_stores:
        return []
    problems = []
    override = "or, on a private network, set ALLOW_PLAINTEXT_STORES=1"
    if cfg.database_url:
        try:
            params = psycopg2.extensions.parse_dsn(cfg.database_url)
        except psycopg2.ProgrammingError:
            params = {}
        hosts = [h.strip() for h in params.get("host", "").split(",")]
        addresses = [a.strip() for a in params.get("hostaddr", "").split(",")]
        # Where libpq connects: hostaddr when given (host then only names the certificate).
        reached = [
            (addresses[i] if i < len(addresses) and addresses[i] else host)
            for i, host in enumerate(hosts if len(hosts) >= len(addresses) else addresses)
        ]
        remote = [h for h in reached if h and not h.startswith("/") and not _is_loopback(h)]
        if remote and params.get("sslmode") not in ("require", "verify-ca", "verify-full"):
            problems.append(
                f"DATABASE_URL reaches {', '.join(remote)} without TLS (add sslmode=verify-full"
                f" and sslrootcert=<the server's CA file>, at least sslmode=require; {override})"
            )
    redis_hosts = [host for host, _ in cfg.redis_sentinels]
    if cfg.redis_url and not cfg.redis_sentinels:
        redis_hosts.append(urllib.parse.urlsplit(cfg.redis_url).hostname or "")
    remote_redis = [h for h in redis_hosts if h and not _is_loopback(h)]
    if remote_redis and not cfg.redis_url.startswith("rediss://"):
        problems.append(
            f"Redis at {', '.join(remote_redis)} is reached without TLS (use a rediss:// REDIS_URL,"
            f" with REDIS_CA_FILE for a private CA; {override})"
        )
    return problems


def production_problems(cfg: Config) -> list[str]:
    """Each unsafe setting in production, as 'cause (fix)'."""
    problems = []
    if not cfg.cookie_secure:
        problems.append("COOKIE_SECURE is off (set COOKIE_SECURE=1 and serve over HTTPS)")
    if cfg.debug_return_reset_token:
        problems.append("DEBUG_RETURN_RESET_TOKEN=1 hands reset tokens to anyone (remove it)")
    if not cfg.database_url:
        problems.append(
            "DATABASE_URL is unset, the SQLite file is for development (point it at PostgreSQL)"
        )
    if not cfg.secret_key:
        problems.append(
            "SECRET_KEY is unset, cookies could not be signed with a key every instance shares"
            " (set it to 64 random hex digits: python -c 'import secrets;"
            " print(secrets.token_hex(32))')"
        )
    problems += plaintext_store_problems(cfg)
    if not cfg.uses_redis:
        problems.append(
            "Redis is not configured, the in-process store serves one process only (set REDIS_URL)"
        )
    with contextlib.suppress(OSError):  # an unresolvable HOST is a setting problem
        if any(address.is_unspecified for address in listen_addresses(cfg.host)):
            problems.append(
                f"HOST={cfg.host} listens on every interface (keep HOST=127.0.0.1 behind"
                " nginx, or name the one private address a remote proxy reaches)"
            )
    for network in cfg.trusted_proxies:
        if network.prefixlen < (8 if network.version == 4 else 16):
            problems.append(
                f"TRUSTED_PROXIES includes {network}: every client could name its own address"
                " in X-Forwarded-For (list only your proxies' addresses or ranges)"
            )
    for provider in cfg.chat_providers:
        url = urllib.parse.urlsplit(provider.base_url)
        if url.scheme == "http" and not _is_loopback(url.hostname or ""):
            problems.append(
                f"{PROVIDER_DEFAULTS[provider.name][0]}_BASE_URL is plain http to"
                f" {url.hostname}: the API key would travel in clear (use https://)"
            )
    if not cfg.smtp_host:
        problems.append(
            "SMTP_HOST is unset, password-reset mail would only be logged (name your mail"
            " relay in SMTP_HOST)"
        )
    if not cfg.chat_providers:
        problems.append(
            "no model provider key, chat would answer with the offline echo provider (set"
            " DEEPSEEK_API_KEY, OPENAI_API_KEY or DASHSCOPE_API_KEY)"
        )
    if not cfg.frontend_base_url.startswith("https://"):
        problems.append(
            "FRONTEND_BASE_URL is not https, reset links would travel in clear"
            " (set it to the site's https:// address)"
        )
    if (
        cfg.smtp_host
        and not cfg.smtp_tls
        and cfg.smtp_port != 465
        and not _is_loopback(cfg.smtp_host)
    ):
        problems.append(
            "SMTP_TLS=0 sends mail and the SMTP password in clear (set SMTP_TLS=1, or port 465)"
        )
    if (
        cfg.argon2_memory_kib < ARGON2_DEFAULT_MEMORY_KIB
        or cfg.argon2_time_cost < ARGON2_DEFAULT_TIME_COST
    ):
        problems.append(
            "Argon2 parameters are below OWASP's minimum (keep ARGON2_MEMORY_KIB >= 19456 and"
            " ARGON2_TIME_COST >= 2)"
        )
    return problems


def _is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _EnvReader:
    """Typed reads of environment variables. A malformed value is noted (naming the
    variable and the fix) and its default used, so that every problem is reported at once;
    `problems` lists them."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ
        self.problems: list[str] = []
        self.read: set[str] = set()  # every variable asked for

    def _raw(self, name: str) -> str | None:
        self.read.add(name)
        value = self._environ.get(name)
        return None if value is None or value.strip() == "" else value.strip()

    def _fail(self, problem: str, default: Any) -> Any:
        self.problems.append(problem)
        return default

    def text(self, name: str, default: str) -> str:
        raw = self._raw(name)
        return default if raw is None else raw

    def secret(self, name: str, default: str = "") -> str:
        """The value exactly as given: passwords may end in a blank."""
        self.read.add(name)
        return self._environ.get(name, default)

    def prompt(self, name: str, default: str) -> str:
        """A text whose blank value means the default."""
        return self.secret(name).strip() or default

    def redis_url(self, name: str, default: str) -> str:
        """REDIS_URL, or one built from REDIS_HOST/PORT/DB/PASSWORD; the default if neither."""
        url = self.secret(name).strip()
        if url:
            return url
        host = self.text("REDIS_HOST", "")
        port = self.integer("REDIS_PORT", 6379, 1, 65535)
        db = self.integer("REDIS_DB", 0, 0, 1_000_000)
        password = self.secret("REDIS_PASSWORD")
        if not host:
            return default
        auth = f":{urllib.parse.quote(password, safe='')}@" if password else ""
        return f"redis://{auth}{host}:{port}/{db}"

    def providers(self, name: str, default: tuple[ProviderConfig, ...]) -> tuple[Any, ...]:
        """The model providers to try, in order: CHAT_PROVIDER (`name`), then CHAT_FALLBACK."""
        configured = {}
        for provider, (prefix, base_url, model) in PROVIDER_DEFAULTS.items():
            configured[provider] = ProviderConfig(
                name=provider,
                base_url=self.url(f"{prefix}_BASE_URL", base_url),
                model=self.text(f"{prefix}_MODEL", model),
                api_key=self.secret(f"{prefix}_API_KEY").strip(),
            )
        with_keys = [p for p, config in configured.items() if config.api_key]
        primary = self.choice(name, with_keys[0] if with_keys else "", tuple(configured))
        fallback = self.text("CHAT_FALLBACK", "").split(",")
        order: list[str] = []
        for provider in [primary, *(f.strip().lower() for f in fallback)]:
            if not provider:
                continue
            if provider not in configured:
                self.problems.append(
                    f"CHAT_FALLBACK names {provider!r} (use {', '.join(configured)})"
                )
            elif not configured[provider].api_key:
                prefix = PROVIDER_DEFAULTS[provider][0]
                self.problems.append(
                    f"chat provider {provider} is chosen but {prefix}_API_KEY is unset (set it)"
                )
            elif provider not in order:
                order.append(provider)
        return tuple(configured[p] for p in order) or default

    def choice(self, name: str, default: str, allowed: tuple[str, ...], upper: bool = False) -> str:
        raw = self._raw(name)
        if raw is None:
            return default
        value = raw.upper() if upper else raw.lower()
        if value not in allowed:
            return self._fail(f"{name}={raw!r} is not one of {', '.join(allowed)}", default)
        return value

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            return self._fail(f"{name}={raw!r} is not a whole number", default)
        if not low <= value <= high:
            return self._fail(f"{name}={value} is outside {low}..{high}", default)
        return value

    def number(self, name: str, default: float, low: float, high: float) -> float:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            return self._fail(f"{name}={raw!r} is not a number of seconds", default)
        if not low <= value <= high:
            return self._fail(f"{name}={value} is outside {low}..{high}", default)
        return value

    def flag(self, name: str, default: bool) -> bool:
        raw = self._raw(name)
        if raw is None:
            return default
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        return self._fail(f"{name}={raw!r} is not a switch (use 1 or 0)", default)

    def url(self, name: str, default: str) -> str:
        raw = self.text(name, default).rstrip("/")
        parts = urllib.parse.urlsplit(raw)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return self._fail(
                f"{name}={raw!r} is not an http(s) URL such as https://example.com", default
            )
        return raw

    def rate(self, name: str, default: RateLimit) -> RateLimit:
        raw = self._raw(name)
        if raw is None:
            return default
        match = re.fullmatch(r"(\d+)\s*/\s*(\d+)", raw)
        if not match or int(match.group(1)) < 1 or int(match.group(2)) < 1:
            return self._fail(f"{name}={raw!r} is not LIMIT/SECONDS, e.g. 10/600", default)
        return RateLimit(int(match.group(1)), int(match.group(2)))

    def origins(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        """A comma-separated list of web origins (scheme://host[:port]), normalised."""
        raw = self._raw(name)
        if raw is None:
            return default
        found = []
        for item in raw.split(","):
            if item.strip():
                origin = web_origin(item.strip())
                if origin is None:
                    self.problems.append(
                        f"{name}: {item.strip()!r} is not an origin such as https://app.example.com"
                    )
                else:
                    found.append(origin)
        return tuple(found)

    def hostports(self, name: str, default: tuple[Any, ...], port: int) -> tuple[Any, ...]:
        """host:port,host:port,... as (host, port) pairs; `port` where one is left out."""
        self.read.add(name)
        raw = self._environ.get(name)
        if raw is None:
            return default
        found = []
        for item in (part.strip() for part in raw.split(",")):
            if not item:
                continue
            host, sep, number = item.rpartition(":") if item.count(":") == 1 else (item, "", "")
            host = (host if sep else item).strip("[]")
            if not host or (sep and not number.isdigit()) or not 0 < int(number or port) < 65536:
                self.problems.append(f"{name}: {item!r} is not host:port")
                continue
            found.append((host, int(number or port)))
        return tuple(found)

    def networks(self, name: str, default: tuple[Any, ...]) -> tuple[Any, ...]:
        self.read.add(name)
        raw = self._environ.get(name)
        if raw is None:
            return default
        networks = []
        for item in raw.split(","):
            if item.strip():
                try:
                    networks.append(ipaddress.ip_network(item.strip(), strict=False))
                except ValueError:
                    self.problems.append(f"{name}: {item.strip()!r} is not an address or CIDR")
        return tuple(networks)


def web_origin(url: str) -> str | None:
    """scheme://host[:port] of a URL, lower-case, the default port dropped; None if none."""
    parts = urllib.parse.urlsplit(url.strip().lower())
    try:
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    if port is None or port == {"http": 80, "https": 443}[parts.scheme]:
        return f"{parts.scheme}://{host}"
    return f"{parts.scheme}://{host}:{port}"


###############################################################################
# Errors
###############################################################################


class ApiError(Exception):
    """A failure the client is told about: HTTP status, stable code, human sentence."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


_HTML_ESCAPES = str.maketrans(
    {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#x27;"}
)


def html_escape(text: str) -> str:
    """Text safe inside HTML, quotes included: html.escape's replacements. (The html module
    loads its table of 2,231 named entities, half a megabyte, to offer unescape.)"""
    return text.translate(_HTML_ESCAPES)


def _escape(text: str) -> str:
    """Text safe for one log line: every character that is not printable (C0 and C1 controls
    such as U+0085, line and paragraph separators, bidi and zero-width marks) escaped, as
    \\xNN or \\uNNNN, the same way for whatever a client or a provider wrote."""
    if text.isascii() and text.isprintable():
        return text
    return "".join(
        c if c.isprintable() else (f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}")
        for c in text
    )


class RedactingFormatter(logging.Formatter):
    """Every log line (tracebacks included) with credentials out: the userinfo of any URL,
    and the configured passwords and keys wherever a driver's error text repeats them (a
    password with an '@' in it comes back from libpq split at the '@', so its pieces too)."""

    def __init__(self, fmt: str, secrets_to_hide: Sequence[str] = ()) -> None:
        super().__init__(fmt)
        pieces = {part for secret in secrets_to_hide for part in (secret, *secret.split("@"))}
        self._hidden = sorted((p for p in pieces if len(p) >= 4), key=len, reverse=True)

    def formatMessage(self, record: logging.LogRecord) -> str:
        # The message on one line, whatever a client or provider put in its arguments; a
        # traceback (added after this) keeps its own lines.
        record.message = _escape(record.message)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        return self.redact(super().format(record))

    def redact(self, text: str) -> str:
        """The text with URL credentials and the configured secrets masked."""
        text = redact_url(text)
        for secret in self._hidden:
            text = text.replace(secret, "***")
        return text


class JsonLogFormatter(RedactingFormatter):
    """LOG_FORMAT=json: one JSON object a line, for log shippers: time, level, logger,
    message, and on a request's line its request_id, method, path, status and ms; masked
    like the text lines, and ASCII only, so no character in it can split the line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": self.redact(record.getMessage()),
        }
        request = getattr(record, "request", None)
        if isinstance(request, dict):
            entry.update(request)
        if record.exc_info:
            entry["traceback"] = self.redact(self.formatException(record.exc_info))
        return json.dumps(entry)


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def config_secrets(cfg: Config) -> list[str]:
    """The passwords and keys of a configuration, for RedactingFormatter to keep out of logs."""
    found = [cfg.smtp_pass, cfg.secret_key, cfg.metrics_token, cfg.redis_sentinel_password]
    found += [p.api_key for p in cfg.chat_providers]
    for url in (cfg.database_url, cfg.redis_url):
        parts = urllib.parse.urlsplit(url) if "://" in url else None
        if parts is not None and parts.password:
            found += [parts.password, urllib.parse.unquote(parts.password)]
        found += re.findall(r"password=(\S+)", url)
    return [secret for secret in found if secret]


def setup_logging(cfg: Config, stream: TextIO | None = None) -> None:
    """One line per record on stdout (for journald), or `stream`; credentials redacted,
    text escaped."""
    handler = logging.StreamHandler(stream or sys.stdout)
    kind = JsonLogFormatter if cfg.log_format == "json" else RedactingFormatter
    handler.setFormatter(kind(LOG_FORMAT, config_secrets(cfg)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(cfg.log_level)


def _json_bytes(payload: Any) -> bytes:
    """Compact UTF-8 JSON, as every answer and stream line is written; U+2028, U+2029 and
    U+0085 escaped, so that any line splitter (str.splitlines, some JavaScript readers)
    sees exactly one JSON object per chat line."""
    text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    if "\u2028" in text or "\u2029" in text or "\x85" in text:
        text = (
            text.replace("\u2028", "\\u2028")
            .replace("\u2029", "\\u2029")
            .replace("\x85", "\\u0085")
        )
    return text.encode("utf-8")


class OutageLog:
    """Warnings that every request repeats while a dependency is down, written once per
    kind every `interval` seconds with a count of the ones left out: an outage at 1,000
    requests a second must not write 2,000 lines a second to journald. Each request
    still gets its own access line, with its status."""

    def __init__(self, interval: float = 10.0) -> None:
        self._interval = interval
        self._kinds: dict[str, tuple[float, int]] = {}  # kind -> (last written, left out)

    def warning(self, kind: str, detail: object) -> None:
        """Log `kind: detail` unless a line of this kind went out within the interval."""
        now = time.monotonic()
        written, left_out = self._kinds.get(kind, (-math.inf, 0))
        if now - written < self._interval:
            self._kinds[kind] = (written, left_out + 1)
            return
        self._kinds[kind] = (now, 0)
        more = f" ({left_out} more like it in the last {now - written:.0f} s)" if left_out else ""
        log.warning("%s: %s%s", kind, detail, more)


class Metrics:
    """What GET /metrics reports, kept in this process's memory: counters by name and
    labels, gauges read when scraped, and one histogram of request latency. Counting is a
    dict update; nothing is allocated per request beyond its label tuple."""

    # Seconds: from a cached /auth/me (under a millisecond) to a chat stream (seconds).
    LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
    HELP: ClassVar[dict[str, str]] = {
        "cloudchat_requests_total": "HTTP requests answered, by route and status",
        "cloudchat_auth_events_total": "Account events (logins by outcome, logouts, ...)",
        "cloudchat_rate_limited_total": "Attempts refused by a rate limit, by action",
        "cloudchat_provider_failures_total": "Model provider failures, by provider and kind",
        "cloudchat_provider_connections_total": (
            "Provider connections used: reused idle, new plain, new TLS (full or resumed)"
        ),
        "cloudchat_chat_tokens_total": "Tokens relayed, by provider and kind",
        "cloudchat_chat_budget_refusals_total": "Chats refused over a daily token budget",
        "cloudchat_mails_total": "Account mails, by kind and outcome",
        "cloudchat_storage_unavailable_total": "Times a store did not answer, by what",
    }

    def __init__(self) -> None:
        self._counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._buckets = [0] * len(self.LATENCY_BUCKETS)
        self._latency_count = 0
        self._latency_sum = 0.0
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    def count(self, name: str, amount: float = 1, **labels: str) -> None:
        """Add to a counter."""
        key = (name, tuple(labels.items()))
        self._counters[key] = self._counters.get(key, 0) + amount

    def observe_request(self, route: str, status: str, seconds: float) -> None:
        """Count an answered request and its latency."""
        self.count("cloudchat_requests_total", route=route, status=status)
        self._latency_count += 1
        self._latency_sum += seconds
        for index, bound in enumerate(self.LATENCY_BUCKETS):
            if seconds <= bound:
                self._buckets[index] += 1
                break

    def render(self) -> str:
        """The Prometheus text format (version 0.0.4)."""
        lines: list[str] = []
        by_name: dict[str, list[tuple[tuple[tuple[str, str], ...], float]]] = {}
        for (name, labels), value in sorted(self._counters.items()):
            by_name.setdefault(name, []).append((labels, value))
        for name, samples in by_name.items():
            lines += [f"# HELP {name} {self.HELP.get(name, name)}", f"# TYPE {name} counter"]
            lines += [f"{name}{_prometheus_labels(labels)} {value:g}" for labels, value in samples]
        for name, (help_text, read) in sorted(self.gauges.items()):
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {read():g}"]
        name = "cloudchat_request_seconds"
        lines += [f"# HELP {name} Time to answer a request (a stream: to its end)"]
        lines += [f"# TYPE {name} histogram"]
        cumulative = 0
        for bound, count in zip(self.LATENCY_BUCKETS, self._buckets, strict=True):
            cumulative += count
            lines.append(f'{name}_bucket{{le="{bound:g}"}} {cumulative}')
        lines.append(f'{name}_bucket{{le="+Inf"}} {self._latency_count}')
        lines.append(f"{name}_sum {self._latency_sum:.6f}")
        lines.append(f"{name}_count {self._latency_count}")
        return "\n".join(lines) + "\n"


def _prometheus_labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    escaped = (
        (name, str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n"))
        for name, value in labels
    )
    return "{" + ",".join(f'{name}="{value}"' for name, value in escaped) + "}"


metrics = Metrics()


outage_log = OutageLog()


class StoreUnavailable(Exception):
    """A storage dependency (SQL or key-value) did not answer in time; becomes a 503. The
    message starts with the store's name ("database: ...", "redis: ...")."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        metrics.count("cloudchat_storage_unavailable_total", store=message.split(":", 1)[0])


class SchemaVersionError(Exception):
    """The database's schema is newer than this server, or (PostgreSQL) older than it."""


class ReferenceGone(Exception):
    """An insert named a row that is gone (an account deleted a moment before)."""


class DuplicateError(Exception):
    """An insert hit a uniqueness constraint; `constraint` names it as the database did."""

    def __init__(self, constraint: str) -> None:
        super().__init__(constraint)
        self.constraint = constraint


###############################################################################
# SQL store
###############################################################################

# The embedded twin of schema.sql: the same tables, SQLite's types.
SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    uid          TEXT NOT NULL UNIQUE,
    email        TEXT NOT NULL
                 CHECK (email = lower(trim(email)) AND length(email) BETWEEN 3 AND 254),
    phone        TEXT UNIQUE CHECK (length(phone) BETWEEN 5 AND 21),
    display_name TEXT CHECK (length(display_name) <= 64),
    is_active    INTEGER NOT NULL DEFAULT 1,
    created_at   TEXT NOT NULL,
    email_verified_at TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS users_email_lower_key ON users (lower(email));
CREATE TABLE IF NOT EXISTS credentials (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id      INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    type         TEXT NOT NULL CHECK (type IN ('password', 'totp', 'webauthn', 'oauth')),
    provider     TEXT,
    provider_uid TEXT,
    secret       TEXT,
    created_at   TEXT NOT NULL,
    updated_at   TEXT NOT NULL,
    confirmed_at TEXT,
    last_step    INTEGER,
    UNIQUE (provider, provider_uid)
);
CREATE UNIQUE INDEX IF NOT EXISTS credentials_user_type_key
    ON credentials (user_id, type) WHERE type <> 'oauth';
CREATE TABLE IF NOT EXISTS sessions (
    id_hash      TEXT PRIMARY KEY CHECK (length(id_hash) = 64),
    user_id      INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    user_agent   TEXT,
    ip           TEXT,
    created_at   TEXT NOT NULL,
    expires_at   TEXT NOT NULL,
    revoked_at   TEXT,
    last_seen_at TEXT
);
CREATE INDEX IF NOT EXISTS sessions_user_id_idx ON sessions (user_id);
CREATE INDEX IF NOT EXISTS sessions_expires_at_idx ON sessions (expires_at);
CREATE TABLE IF NOT EXISTS password_resets (
    token_hash   TEXT PRIMARY KEY CHECK (length(token_hash) = 64),
    user_id      INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at   TEXT NOT NULL,
    expires_at   TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS password_resets_user_id_idx ON password_resets (user_id);
CREATE TABLE IF NOT EXISTS server_secrets (
    name         TEXT PRIMARY KEY,
    value        TEXT NOT NULL,
    created_at   TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS schema_migrations (
    version      INTEGER PRIMARY KEY,
    description  TEXT NOT NULL,
    applied_at   TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS email_tokens (
    token_hash   TEXT PRIMARY KEY CHECK (length(token_hash) = 64),
    user_id      INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    purpose      TEXT NOT NULL CHECK (purpose IN ('verify', 'change')),
    email        TEXT NOT NULL,
    created_at   TEXT NOT NULL,
    expires_at   TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS email_tokens_user_id_idx ON email_tokens (user_id);
CREATE INDEX IF NOT EXISTS email_tokens_expires_at_idx ON email_tokens (expires_at);
CREATE TABLE IF NOT EXISTS auth_events (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at   TEXT NOT NULL,
    user_id      INTEGER REFERENCES users (id) ON DELETE CASCADE,
    event        TEXT NOT NULL,
    detail       TEXT,
    ip           TEXT,
    user_agent   TEXT,
    request_id   TEXT
);
CREATE INDEX IF NOT EXISTS auth_events_user_id_idx ON auth_events (user_id, created_at);
CREATE INDEX IF NOT EXISTS auth_events_created_at_idx ON auth_events (created_at);
CREATE TABLE IF NOT EXISTS mfa_recovery_codes (
    code_hash    TEXT PRIMARY KEY CHECK (length(code_hash) = 64),
    user_id      INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at   TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS mfa_recovery_codes_user_id_idx ON mfa_recovery_codes (user_id);
CREATE TABLE IF NOT EXISTS chat_usage (
    day          TEXT NOT NULL,
    owner        TEXT NOT NULL,
    user_id      INTEGER REFERENCES users (id) ON DELETE CASCADE,
    address      TEXT NOT NULL,
    provider     TEXT NOT NULL,
    model        TEXT NOT NULL,
    requests     INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    estimated    INTEGER NOT NULL,
    PRIMARY KEY (day, owner, address, provider, model)
);
CREATE INDEX IF NOT EXISTS chat_usage_user_id_idx ON chat_usage (user_id);
"""

# The schema's version history, forward only: (version, what changed, the step for
# PostgreSQL, the step for SQLite). Version 1 is the first release's schema. A new database
# gets the whole current schema (schema.sql, SQLITE_SCHEMA) and every version recorded; an
# existing one runs the steps it lacks (an empty step: the CREATE ... IF NOT EXISTS of the
# whole schema did it). The next change appends a step here and edits both schemas.
MIGRATIONS: tuple[tuple[int, str, tuple[str, ...], tuple[str, ...]], ...] = (
    (1, "users, credentials, sessions, password resets", (), ()),
    (2, "server_secrets: the key that signs cookies in development", (), ()),
    (
        3,
        "sessions.last_seen_at: sessions per device",
        ("ALTER TABLE sessions ADD COLUMN IF NOT EXISTS last_seen_at timestamptz",),
        ("ALTER TABLE sessions ADD COLUMN last_seen_at TEXT",),
    ),
    (
        4,
        "users.email_verified_at, email_tokens, auth_events: verification and audit",
        ("ALTER TABLE users ADD COLUMN IF NOT EXISTS email_verified_at timestamptz",),
        ("ALTER TABLE users ADD COLUMN email_verified_at TEXT",),
    ),
    (
        5,
        "credentials.confirmed_at and last_step, mfa_recovery_codes: two-factor sign-in",
        (
            "ALTER TABLE credentials ADD COLUMN IF NOT EXISTS confirmed_at timestamptz",
            "ALTER TABLE credentials ADD COLUMN IF NOT EXISTS last_step bigint",
        ),
        (
            "ALTER TABLE credentials ADD COLUMN confirmed_at TEXT",
            "ALTER TABLE credentials ADD COLUMN last_step INTEGER",
        ),
    ),
    (6, "chat_usage: tokens per day, owner, address and model", (), ()),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]

SCHEMA_LOCK_KEY = 0x636C6F7564  # "cloud": pg_advisory_xact_lock key of `initdb`
SCHEMA_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "schema.sql")

# SQLite keeps times as text in this one sortable UTC format.
_SQLITE_TIME_FORMAT = "%Y-%m-%d %H:%M:%S.%f+00:00"


def utcnow() -> dt.datetime:
    """The current time, timezone-aware, in UTC."""
    return dt.datetime.now(dt.UTC)


def as_datetime(value: dt.datetime | str) -> dt.datetime:
    """A stored time as an aware datetime, whichever database it came from."""
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    return dt.datetime.fromisoformat(value)


class SqlTx:
    """Statements on one borrowed connection; SQL is written once, with %s placeholders."""

    def __init__(self, cursor: Any, adapt: Callable[[str, tuple], tuple[str, tuple]]) -> None:
        self._cursor = cursor
        self._adapt = adapt

    def run(self, sql: str, params: tuple = ()) -> int:
        """Execute a statement; return the number of rows it touched."""
        self._cursor.execute(*self._adapt(sql, params))
        return self._cursor.rowcount

    def one(self, sql: str, params: tuple = ()) -> tuple | None:
        """Execute a query; return its first row or None."""
        self._cursor.execute(*self._adapt(sql, params))
        return self._cursor.fetchone()

    def all(self, sql: str, params: tuple = ()) -> list[tuple]:
        """Execute a query; return every row."""
        self._cursor.execute(*self._adapt(sql, params))
        return self._cursor.fetchall()


class SqlStore:
    """Single statements (autocommit) and explicit transactions over pooled connections."""

    begin_statement = "BEGIN"

    def _lend(self) -> contextlib.AbstractContextManager[Any]:
        raise NotImplementedError

    def _adapt(self, sql: str, params: tuple) -> tuple[str, tuple]:
        return sql, params

    @contextlib.contextmanager
    def transaction(self) -> Iterator[SqlTx]:
        """A block of statements that commit together or not at all."""
        with self._lend() as conn:
            cursor = conn.cursor()
            try:
                cursor.execute(self.begin_statement)
                yield SqlTx(cursor, self._adapt)
            except BaseException:
                with contextlib.suppress(Exception):
                    cursor.execute("ROLLBACK")
                raise
            else:
                cursor.execute("COMMIT")
            finally:
                with contextlib.suppress(Exception):
                    cursor.close()

    @contextlib.contextmanager
    def _statement(self) -> Iterator[SqlTx]:
        with self._lend() as conn:
            cursor = conn.cursor()
            try:
                yield SqlTx(cursor, self._adapt)
            finally:
                with contextlib.suppress(Exception):
                    cursor.close()

    def run(self, sql: str, params: tuple = ()) -> int:
        """One statement in its own transaction; the number of rows it touched."""
        with self._statement() as tx:
            return tx.run(sql, params)

    def one(self, sql: str, params: tuple = ()) -> tuple | None:
        """One query in its own transaction; its first row or None."""
        with self._statement() as tx:
            return tx.one(sql, params)

    def all(self, sql: str, params: tuple = ()) -> list[tuple]:
        """One query in its own transaction; every row."""
        with self._statement() as tx:
            return tx.all(sql, params)

    def ping(self) -> None:
        """Raise StoreUnavailable unless the database answers."""
        self.one("SELECT 1")

    def apply_schema(self, script: str) -> None:
        """Run a schema script of idempotent statements."""
        raise NotImplementedError

    def try_lock(self, tx: SqlTx, key: int) -> bool:
        """Take a lock for the rest of the transaction `tx` unless another one holds it;
        False then. SQLite's BEGIN IMMEDIATE already lets one writer in at a time."""
        return True

    def close(self) -> None:
        """Close every connection."""


class PostgresStore(SqlStore):
    """PostgreSQL through a small pool of autocommit connections.

    Safe behind PgBouncer in transaction mode: no SET, no session state, no server-side
    prepared statements; a multi-statement unit is an explicit BEGIN ... COMMIT.
    """

    def __init__(self, dsn: str, pool_size: int, timeout: float) -> None:
        self._dsn = dsn
        self._timeout = timeout
        self._targets = dsn_targets(dsn)
        self._first_target = 0  # the one that answered last: tried first next time
        self._idle: list[Any] = []
        self._slots = threading.BoundedSemaphore(pool_size)
        # The health check's own connection (see ping) and the lock that keeps it one's.
        self._ping_conn: Any = None
        self._pinging = threading.Lock()
        if gevent.monkey.is_module_patched("socket"):
            # Without this psycopg2 blocks the whole event loop while it waits.
            psycopg2.extensions.set_wait_callback(_gevent_wait_callback(timeout))

    def _connect(self) -> Any:
        # A multi-host DATABASE_URL (host=a,b target_session_attrs=read-write) is tried one
        # host at a time, each with its own timeout: under gevent a connect gives up after
        # DB_TIMEOUT as a whole, and a hung first host would keep libpq from ever trying
        # the second.
        timeout = max(1, math.ceil(self._timeout))
        order = self._targets[self._first_target :] + self._targets[: self._first_target]
        failure: Exception | None = None
        for target in order:
            try:
                conn = psycopg2.connect(self._dsn, connect_timeout=timeout, **target)
            except psycopg2.OperationalError as exc:
                failure = exc
                continue
            self._first_target = self._targets.index(target)
            conn.autocommit = True
            return conn
        assert failure is not None
        raise failure

    def _checkout(self) -> Any:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and not _socket_has_input(conn.fileno()):
                return conn
            # An idle connection never has anything to read: the server or PgBouncer said
            # goodbye (restart, idle timeout). Replace it instead of lending it out.
            with contextlib.suppress(Exception):
                conn.close()
        return self._connect()

    @contextlib.contextmanager
    def _lend(self) -> Iterator[Any]:
        if not self._slots.acquire(timeout=self._timeout):
            raise StoreUnavailable("database: every pooled connection stayed busy")
        conn = None
        try:
            conn = self._checkout()
            yield conn
        except psycopg2.IntegrityError as exc:
            if exc.pgcode == psycopg2.errorcodes.UNIQUE_VIOLATION:
                raise DuplicateError(exc.diag.constraint_name or str(exc)) from exc
            if exc.pgcode == psycopg2.errorcodes.FOREIGN_KEY_VIOLATION:
                raise ReferenceGone(exc.diag.constraint_name or str(exc)) from exc
            raise
        except (psycopg2.OperationalError, psycopg2.InterfaceError, OSError) as exc:
            # libpq's messages run over several lines (one per host tried): one line here.
            raise StoreUnavailable(f"database: {' '.join(str(exc).split())}") from exc
        finally:
            if conn is not None:
                reusable = (
                    not conn.closed
                    and conn.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE
                )
                if reusable:
                    self._idle.append(conn)
                else:
                    with contextlib.suppress(Exception):
                        conn.close()
            self._slots.release()

    def ping(self) -> None:
        """SELECT 1 on a connection of its own, outside the pool: behind a burst of chats
        the pool's queue is other requests, not an outage, and a load balancer's check
        must not wait in it."""
        if not self._pinging.acquire(timeout=self._timeout):
            raise StoreUnavailable("database: the previous health check still waits")
        try:
            conn = self._ping_conn
            if conn is None or conn.closed or _socket_has_input(conn.fileno()):
                self._drop_ping_conn()  # an idle connection with input was closed on us
                conn = self._ping_conn = self._connect()
            with conn.cursor() as cursor:
                cursor.execute("SELECT 1")
                cursor.fetchone()
        except (psycopg2.Error, OSError) as exc:
            self._drop_ping_conn()
            raise StoreUnavailable(f"database: {' '.join(str(exc).split())}") from exc
        except BaseException:
            self._drop_ping_conn()  # killed mid-query (HEALTH_TIMEOUT): not reusable
            raise
        finally:
            self._pinging.release()

    def _drop_ping_conn(self) -> None:
        conn, self._ping_conn = self._ping_conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def apply_schema(self, script: str) -> None:
        with self.transaction() as tx:
            # Two instances starting at once would race on CREATE ... IF NOT EXISTS (which
            # is not atomic in the catalog); the lock lets one apply and the other find it.
            tx.run("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))
            existed = tx.one("SELECT to_regclass('users') IS NOT NULL")[0]
            tx.run(script)
            upgrade_schema(tx, bool(existed), sqlite=False)

    def try_lock(self, tx: SqlTx, key: int) -> bool:
        # A transaction-level lock: PgBouncer's transaction mode allows no session state.
        row = tx.one("SELECT pg_try_advisory_xact_lock(%s)", (key,))
        return bool(row and row[0])

    def close(self) -> None:
        while self._idle:
            with contextlib.suppress(Exception):
                self._idle.pop().close()
        self._drop_ping_conn()


def dsn_targets(dsn: str) -> list[dict[str, str]]:
    """The hosts of a DATABASE_URL one by one, as connect() overrides of host, port and
    hostaddr; [{}] for a single host (the DSN as it is)."""
    try:
        params = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError:
        return [{}]
    lists = {name: params.get(name, "").split(",") for name in ("host", "port", "hostaddr")}
    count = max(len(values) for values in lists.values())
    if count < 2:
        return [{}]
    targets = []
    for index in range(count):
        target = {}
        for name, values in lists.items():
            value = values[index] if len(values) == count else values[0]
            if value:
                target[name] = value
        targets.append(target)
    return targets


def _gevent_wait_callback(timeout: float) -> Callable[[Any], None]:
    """psycopg2's wait callback for gevent: yield to the loop, give up after `timeout`."""

    def wait(conn: Any) -> None:
        while True:
            state = conn.poll()
            if state == psycopg2.extensions.POLL_OK:
                return
            exc = psycopg2.OperationalError(f"no answer within {timeout:g} s")
            if state == psycopg2.extensions.POLL_READ:
                gevent.socket.wait_read(conn.fileno(), timeout=timeout, timeout_exc=exc)
            elif state == psycopg2.extensions.POLL_WRITE:
                gevent.socket.wait_write(conn.fileno(), timeout=timeout, timeout_exc=exc)
            else:
                raise psycopg2.OperationalError(f"unexpected poll state {state}")

    return wait


def _socket_has_input(fileno: int) -> bool:
    """True if a socket has bytes (or EOF) waiting; never blocks."""
    poller = _real_poll()
    try:
        poller.register(fileno, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


class SqliteStore(SqlStore):
    """One SQLite connection in WAL mode, shared under a lock; the embedded default."""

    begin_statement = "BEGIN IMMEDIATE"

    def __init__(self, path: str, timeout: float) -> None:
        self._conn = sqlite3.connect(
            path, timeout=timeout, isolation_level=None, check_same_thread=False
        )
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._lock = threading.RLock()
        self.apply_schema(SQLITE_SCHEMA)

    def _adapt(self, sql: str, params: tuple) -> tuple[str, tuple]:
        return _qmark(sql), tuple(
            p.astimezone(dt.UTC).strftime(_SQLITE_TIME_FORMAT) if isinstance(p, dt.datetime) else p
            for p in params
        )

    @contextlib.contextmanager
    def _lend(self) -> Iterator[Any]:
        with self._lock:
            try:
                yield self._conn
            except sqlite3.IntegrityError as exc:
                if "UNIQUE" in str(exc):
                    raise DuplicateError(str(exc)) from exc
                if "FOREIGN KEY" in str(exc):
                    raise ReferenceGone(str(exc)) from exc
                raise
            except sqlite3.OperationalError as exc:
                raise StoreUnavailable(f"database: {exc}") from exc

    def apply_schema(self, script: str) -> None:
        with self._lock:
            existed = self._conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'users'"
            ).fetchone()
            self._conn.executescript(script)
        with self.transaction() as tx:
            upgrade_schema(tx, existed is not None, sqlite=True)

    def close(self) -> None:
        with self._lock:
            self._conn.close()


@functools.lru_cache(maxsize=256)
def _qmark(sql: str) -> str:
    """The same statement with SQLite's placeholders."""
    return sql.replace("%s", "?")


def open_sql_store(cfg: Config) -> SqlStore:
    """PostgreSQL when DATABASE_URL is set, else the SQLite file."""
    if cfg.database_url:
        return PostgresStore(cfg.database_url, cfg.db_pool_size, cfg.db_timeout)
    return SqliteStore(cfg.db_path, cfg.db_timeout)


@dataclasses.dataclass(frozen=True)
class User:
    """An account as the server works with it (never its password), whichever database or
    the session cache it came from."""

    id: int
    uid: str
    email: str
    phone: str | None
    display_name: str | None
    is_active: bool
    email_verified: bool = False
    mfa_enabled: bool = False

    def public(self) -> dict[str, Any]:
        """The `user` object of GET /auth/me."""
        return dataclasses.asdict(self)


def upgrade_schema(tx: SqlTx, existed: bool, sqlite: bool) -> None:
    """Run the migration steps an existing database lacks and record every version; a
    database newer than this server is refused (SchemaVersionError)."""
    row = tx.one("SELECT max(version) FROM schema_migrations")
    current = row[0] if row and row[0] is not None else (1 if existed else 0)
    if current > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"the database's schema is version {current}, newer than this server's"
            f" {SCHEMA_VERSION}: run the release that made it (or a newer one)"
        )
    for version, description, postgres_steps, sqlite_steps in MIGRATIONS:
        if version < current or (version == current and row and row[0] is not None):
            continue
        if existed and version > 1:
            for statement in sqlite_steps if sqlite else postgres_steps:
                tx.run(statement)
        tx.run(
            "INSERT INTO schema_migrations (version, description, applied_at) VALUES (%s, %s, %s)",
            (version, description, utcnow()),
        )


def get_schema_version(sql: SqlStore) -> int:
    """The newest schema version recorded in the database (0: none)."""
    row = sql.one("SELECT max(version) FROM schema_migrations")
    return int(row[0]) if row and row[0] is not None else 0


def _user_from_row(row: tuple) -> User:
    return User(
        int(row[0]), str(row[1]), row[2], row[3], row[4], bool(row[5]), bool(row[6]), bool(row[7])
    )


# What _user_from_row reads: the first _USER_WIDTH columns of a row.
_USER_COLUMNS = (
    "u.id, u.uid, u.email, u.phone, u.display_name, u.is_active,"
    " u.email_verified_at IS NOT NULL,"
    " EXISTS (SELECT 1 FROM credentials m"
    " WHERE m.user_id = u.id AND m.type = 'totp' AND m.confirmed_at IS NOT NULL)"
)
_USER_WIDTH = 8


def insert_user(
    sql: SqlStore, email: str, phone: str | None, display_name: str | None, password_hash: str
) -> int:
    """Create a user with a password credential; raise DuplicateError if email or phone exist."""
    now = utcnow()
    with sql.transaction() as tx:
        row = tx.one(
            "INSERT INTO users (uid, email, phone, display_name, is_active, created_at)"
            " VALUES (%s, %s, %s, %s, %s, %s) RETURNING id",
            (str(uuid.uuid4()), email, phone, display_name, True, now),
        )
        assert row is not None
        tx.run(
            "INSERT INTO credentials (user_id, type, secret, created_at, updated_at)"
            " VALUES (%s, 'password', %s, %s, %s)",
            (row[0], password_hash, now, now),
        )
    return int(row[0])


def get_user_by_id(sql: SqlStore, user_id: int) -> User | None:
    """The user with this internal id, or None."""
    row = sql.one(f"SELECT {_USER_COLUMNS} FROM users u WHERE u.id = %s", (user_id,))
    return _user_from_row(row) if row else None


def get_user_by_email(sql: SqlStore, email: str) -> User | None:
    """The user with this (normalised) email, or None."""
    row = sql.one(f"SELECT {_USER_COLUMNS} FROM users u WHERE lower(u.email) = %s", (email,))
    return _user_from_row(row) if row else None


def get_password_hash(sql: SqlStore, user_id: int) -> str | None:
    """The stored password hash of a user, or None."""
    row = sql.one(
        "SELECT secret FROM credentials WHERE user_id = %s AND type = 'password'", (user_id,)
    )
    return str(row[0]) if row else None


def get_password_login(
    sql: SqlStore, email: str | None, phone: str | None
) -> tuple[User, str] | None:
    """The user and password hash for a login by email or phone, or None."""
    row = sql.one(
        f"SELECT {_USER_COLUMNS}, c.secret FROM users u"
        " JOIN credentials c ON c.user_id = u.id AND c.type = 'password'"
        " WHERE lower(u.email) = %s OR u.phone = %s",
        (email, phone),
    )
    return (_user_from_row(row), row[_USER_WIDTH]) if row else None


def update_password_hash(sql: SqlStore, user_id: int, password_hash: str) -> None:
    """Replace the stored password hash of a user."""
    sql.run(
        "UPDATE credentials SET secret = %s, updated_at = %s"
        " WHERE user_id = %s AND type = 'password'",
        (password_hash, utcnow(), user_id),
    )


def insert_session(
    sql: SqlStore,
    id_hash: str,
    user_id: int,
    user_agent: str,
    ip: str,
    expires_at: dt.datetime,
    keep_at_most: int,
) -> list[str]:
    """Store a new durable session and drop the user's expired ones; beyond keep_at_most
    live sessions, end the least recently used. Returns the hashes of those it ended."""
    now = utcnow()
    with sql.transaction() as tx:
        tx.run(
            "DELETE FROM sessions WHERE user_id = %s AND expires_at < %s",
            (user_id, now),
        )
        live = tx.all(
            "SELECT id_hash FROM sessions WHERE user_id = %s AND revoked_at IS NULL"
            " ORDER BY COALESCE(last_seen_at, created_at) DESC, created_at DESC",
            (user_id,),
        )
        ended = [row[0] for row in live[max(0, keep_at_most - 1) :]]
        for old in ended:
            tx.run("UPDATE sessions SET revoked_at = %s WHERE id_hash = %s", (now, old))
        tx.run(
            "INSERT INTO sessions"
            " (id_hash, user_id, user_agent, ip, created_at, expires_at, last_seen_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (id_hash, user_id, user_agent, ip, now, expires_at, now),
        )
    return ended


def get_live_session_user(
    sql: SqlStore, id_hash: str, idle: dt.timedelta
) -> tuple[User, dt.datetime] | None:
    """(user, expiry) of an unrevoked, unexpired session used within `idle`, or None; the
    user may be inactive. Marks the session seen now when its mark is older than a minute
    (or a tenth of `idle`, if shorter): a write now and then, not one per request."""
    now = utcnow()
    row = sql.one(
        f"SELECT {_USER_COLUMNS}, s.expires_at, COALESCE(s.last_seen_at, s.created_at)"
        " FROM sessions s JOIN users u ON u.id = s.user_id"
        " WHERE s.id_hash = %s AND s.revoked_at IS NULL AND s.expires_at > %s"
        " AND COALESCE(s.last_seen_at, s.created_at) > %s",
        (id_hash, now, now - idle),
    )
    if row is None:
        return None
    expires_at, last_seen = row[_USER_WIDTH], row[_USER_WIDTH + 1]
    if now - as_datetime(last_seen) > min(LAST_SEEN_EVERY, idle / 10):
        sql.run("UPDATE sessions SET last_seen_at = %s WHERE id_hash = %s", (now, id_hash))
    return _user_from_row(row), as_datetime(expires_at)


LAST_SEEN_EVERY = dt.timedelta(seconds=60)


def list_user_sessions(sql: SqlStore, user_id: int, idle: dt.timedelta) -> list[tuple]:
    """The user's live sessions (used within `idle`), newest first: (id_hash, user_agent,
    ip, created_at, last_seen_at, expires_at)."""
    now = utcnow()
    return sql.all(
        "SELECT id_hash, user_agent, ip, created_at, last_seen_at, expires_at FROM sessions"
        " WHERE user_id = %s AND revoked_at IS NULL AND expires_at > %s"
        " AND COALESCE(last_seen_at, created_at) > %s ORDER BY created_at DESC",
        (user_id, now, now - idle),
    )


def set_user_active(sql: SqlStore, email: str, active: bool) -> int | None:
    """Mark the account with this (normalised) email active or not; its id, or None."""
    row = sql.one(
        "UPDATE users SET is_active = %s WHERE lower(email) = %s RETURNING id", (active, email)
    )
    return int(row[0]) if row else None


def mark_session_revoked(sql: SqlStore, id_hash: str) -> bool:
    """End one durable session; True if it was not ended already."""
    return (
        sql.run(
            "UPDATE sessions SET revoked_at = %s WHERE id_hash = %s AND revoked_at IS NULL",
            (utcnow(), id_hash),
        )
        > 0
    )


def mark_user_sessions_revoked(
    sql: SqlStore, user_id: int, keep_hash: str | None = None
) -> list[str]:
    """End every live session of a user (but `keep_hash`); return their hashes."""
    rows = sql.all(
        "UPDATE sessions SET revoked_at = %s"
        " WHERE user_id = %s AND revoked_at IS NULL AND expires_at > %s AND id_hash <> %s"
        " RETURNING id_hash",
        (utcnow(), user_id, utcnow(), keep_hash or ""),
    )
    return [row[0] for row in rows]


def replace_reset_token(sql: SqlStore, user_id: int, id_hash: str, expires_at: dt.datetime) -> None:
    """Store a user's new reset token (hashed); every older one stops working."""
    with sql.transaction() as tx:
        tx.run("DELETE FROM password_resets WHERE user_id = %s", (user_id,))
        tx.run(
            "INSERT INTO password_resets (token_hash, user_id, created_at, expires_at)"
            " VALUES (%s, %s, %s, %s)",
            (id_hash, user_id, utcnow(), expires_at),
        )


def get_or_create_server_secret(sql: SqlStore, name: str) -> str:
    """A random secret kept in the database, made by whichever process asks first.

    Development only: production sets SECRET_KEY, so that a database dump alone does not
    hold the key that signs its cookies.
    """
    query = "SELECT value FROM server_secrets WHERE name = %s"
    try:
        row = sql.one(query, (name,))
        if row is None:
            with contextlib.suppress(DuplicateError):  # another process made it first
                sql.run(
                    "INSERT INTO server_secrets (name, value, created_at) VALUES (%s, %s, %s)",
                    (name, secrets.token_hex(32), utcnow()),
                )
            row = sql.one(query, (name,))
    except (psycopg2.ProgrammingError, sqlite3.DatabaseError) as exc:
        raise ConfigError(
            f"the database has no table server_secrets ({str(exc).strip()}): run"
            " `python cloudchat.py initdb`, or set SECRET_KEY"
        ) from exc
    assert row is not None
    return str(row[0])


def delete_reset_tokens(sql: SqlStore, user_id: int) -> None:
    """End every password-reset and change-of-address link still out for a user."""
    with sql.transaction() as tx:
        tx.run("DELETE FROM password_resets WHERE user_id = %s", (user_id,))
        tx.run("DELETE FROM email_tokens WHERE user_id = %s AND purpose = 'change'", (user_id,))


def get_reset_user_id(sql: SqlStore, id_hash: str) -> int | None:
    """The active user a live reset token belongs to, or None."""
    row = sql.one(
        "SELECT r.user_id FROM password_resets r JOIN users u ON u.id = r.user_id"
        " WHERE r.token_hash = %s AND r.expires_at > %s AND u.is_active",
        (id_hash, utcnow()),
    )
    return int(row[0]) if row else None


def consume_reset_token(sql: SqlStore, id_hash: str, password_hash: str) -> int | None:
    """Use a live reset token of an active user once and set the new password hash; the
    user id, or None."""
    with sql.transaction() as tx:
        # DELETE ... RETURNING claims the row: of two concurrent uses, one gets it.
        row = tx.one(
            "DELETE FROM password_resets WHERE token_hash = %s AND expires_at > %s"
            " RETURNING user_id",
            (id_hash, utcnow()),
        )
        if row is None or not tx.one("SELECT is_active FROM users WHERE id = %s", (row[0],))[0]:
            return None
        tx.run(
            "UPDATE credentials SET secret = %s, updated_at = %s"
            " WHERE user_id = %s AND type = 'password'",
            (password_hash, utcnow(), row[0]),
        )
    return int(row[0])


# -- profile, addresses, deletion ---------------------------------------------------------


def update_profile(
    sql: SqlStore, user_id: int, display_name: str | None, phone: str | None
) -> None:
    """Set a user's display name and phone (None clears); DuplicateError if the phone is
    another account's."""
    sql.run(
        "UPDATE users SET display_name = %s, phone = %s WHERE id = %s",
        (display_name, phone, user_id),
    )


def replace_email_token(
    sql: SqlStore, user_id: int, purpose: str, email: str, id_hash: str, expires_at: dt.datetime
) -> None:
    """Store a user's new address link (hashed) for `purpose` (verify, change); every older
    link of that purpose stops working."""
    with sql.transaction() as tx:
        tx.run("DELETE FROM email_tokens WHERE user_id = %s AND purpose = %s", (user_id, purpose))
        tx.run(
            "INSERT INTO email_tokens (token_hash, user_id, purpose, email, created_at, expires_at)"
            " VALUES (%s, %s, %s, %s, %s, %s)",
            (id_hash, user_id, purpose, email, utcnow(), expires_at),
        )


def use_email_token(sql: SqlStore, id_hash: str) -> tuple[int, str, str] | None:
    """Use a live address link once: mark the address verified (purpose verify, while it is
    still the account's) or make the new address the account's (change; DuplicateError if
    another account has it now). (user id, purpose, address), or None for a link that is
    unknown, used, expired, stale or of an inactive account."""
    now = utcnow()
    with sql.transaction() as tx:
        # DELETE ... RETURNING claims the row: of two concurrent uses, one gets it.
        row = tx.one(
            "DELETE FROM email_tokens WHERE token_hash = %s AND expires_at > %s"
            " RETURNING user_id, purpose, email",
            (id_hash, now),
        )
        if row is None:
            return None
        user_id, purpose, email = int(row[0]), str(row[1]), str(row[2])
        if purpose == "change":
            changed = tx.run(
                "UPDATE users SET email = %s, email_verified_at = %s WHERE id = %s AND is_active",
                (email, now, user_id),
            )
            # The old address's links (and any other change) are void with it.
            tx.run("DELETE FROM email_tokens WHERE user_id = %s", (user_id,))
        else:
            changed = tx.run(
                "UPDATE users SET email_verified_at = COALESCE(email_verified_at, %s)"
                " WHERE id = %s AND lower(email) = %s AND is_active",
                (now, user_id, email),
            )
    return (user_id, purpose, email) if changed else None


def set_email_verified(sql: SqlStore, user_id: int) -> None:
    """Mark the account's present address verified (an operator's word for it)."""
    with sql.transaction() as tx:
        tx.run(
            "UPDATE users SET email_verified_at = COALESCE(email_verified_at, %s) WHERE id = %s",
            (utcnow(), user_id),
        )
        tx.run("DELETE FROM email_tokens WHERE user_id = %s AND purpose = 'verify'", (user_id,))


def delete_user(
    sql: SqlStore, user_id: int, tombstone: tuple[str, str, str, str]
) -> list[str] | None:
    """Remove an account and every row tied to it (credentials, sessions, links, audit
    rows: the foreign keys cascade) in one transaction, leaving one account_deleted event
    (detail, ip, user agent, request id; the account's id in its detail) behind. The hashes
    of its sessions, whose cache keys must be marked; None if the account was gone already
    (of two concurrent deletions, the second waits for the first's locks, then finds none)."""
    with sql.transaction() as tx:
        hashes = [
            row[0]
            for row in tx.all(
                "DELETE FROM sessions WHERE user_id = %s RETURNING id_hash", (user_id,)
            )
        ]
        if not tx.run("DELETE FROM users WHERE id = %s", (user_id,)):
            return None
        detail, *origin = tombstone
        tx.run(
            "INSERT INTO auth_events"
            " (created_at, user_id, event, detail, ip, user_agent, request_id)"
            " VALUES (%s, NULL, 'account_deleted', %s, %s, %s, %s)",
            (utcnow(), f"user={user_id} {detail}", *origin),
        )
    return hashes


def get_user_record(sql: SqlStore, user_id: int) -> dict[str, Any] | None:
    """Everything the users table holds of an account, for an export; None if unknown."""
    row = sql.one(
        "SELECT uid, email, phone, display_name, is_active, created_at, email_verified_at"
        " FROM users WHERE id = %s",
        (user_id,),
    )
    if row is None:
        return None
    names = ("uid", "email", "phone", "display_name", "is_active", "created_at")
    record = dict(zip(names, row, strict=False))
    record.update(uid=str(row[0]), is_active=bool(row[4]), email_verified_at=row[6])
    return record


def list_all_user_sessions(sql: SqlStore, user_id: int) -> list[tuple]:
    """Every stored session row of a user, ended ones too (until the cleanup job deletes
    them), newest first: (id_hash, user_agent, ip, created_at, last_seen_at, expires_at,
    revoked_at)."""
    return sql.all(
        "SELECT id_hash, user_agent, ip, created_at, last_seen_at, expires_at, revoked_at"
        " FROM sessions WHERE user_id = %s ORDER BY created_at DESC",
        (user_id,),
    )


def list_email_tokens(sql: SqlStore, user_id: int) -> list[tuple]:
    """A user's address links still out (never the tokens): (purpose, email, created_at,
    expires_at)."""
    return sql.all(
        "SELECT purpose, email, created_at, expires_at FROM email_tokens WHERE user_id = %s",
        (user_id,),
    )


def search_users(sql: SqlStore, search: str, limit: int) -> list[tuple]:
    """Accounts whose email, phone or display name contains `search` (case-insensitive),
    newest first: (id, email, phone, display_name, is_active, email verified, created_at)."""
    escaped = search.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    pattern = f"%{escaped}%"
    return sql.all(
        "SELECT id, email, phone, display_name, is_active, email_verified_at IS NOT NULL,"
        " created_at FROM users WHERE lower(email) LIKE %s ESCAPE '\\'"
        " OR COALESCE(phone, '') LIKE %s ESCAPE '\\'"
        " OR lower(COALESCE(display_name, '')) LIKE %s ESCAPE '\\'"
        " ORDER BY id DESC LIMIT %s",
        (pattern, pattern, pattern, limit),
    )


# -- two-factor sign-in --------------------------------------------------------------------


class TotpCredential(NamedTuple):
    """A user's authenticator secret: confirmed (on) or still being set up, and the last
    time step a code of it was accepted in."""

    secret: str
    confirmed: bool
    last_step: int | None


def get_totp(sql: SqlStore, user_id: int) -> TotpCredential | None:
    """The user's TOTP credential, confirmed or pending, or None."""
    row = sql.one(
        "SELECT secret, confirmed_at IS NOT NULL, last_step FROM credentials"
        " WHERE user_id = %s AND type = 'totp'",
        (user_id,),
    )
    if row is None:
        return None
    return TotpCredential(str(row[0]), bool(row[1]), None if row[2] is None else int(row[2]))


def set_pending_totp(sql: SqlStore, user_id: int, secret: str) -> bool:
    """Store a new secret being set up, replacing a pending one; False (nothing changed) if
    the user has a confirmed one. DuplicateError if a concurrent setup won."""
    now = utcnow()
    with sql.transaction() as tx:
        deleted = tx.run(
            "DELETE FROM credentials WHERE user_id = %s AND type = 'totp' AND confirmed_at IS NULL",
            (user_id,),
        )
        if not deleted and tx.one(
            "SELECT 1 FROM credentials WHERE user_id = %s AND type = 'totp'", (user_id,)
        ):
            return False
        tx.run(
            "INSERT INTO credentials (user_id, type, secret, created_at, updated_at)"
            " VALUES (%s, 'totp', %s, %s, %s)",
            (user_id, secret, now, now),
        )
    return True


def confirm_totp(
    sql: SqlStore, user_id: int, secret: str, step: int, code_hashes: Sequence[str]
) -> bool:
    """Switch the pending secret `secret` on, its code of `step` used, with a new set of
    recovery codes; False if it is no longer the pending one (replaced, or confirmed by a
    concurrent request)."""
    now = utcnow()
    with sql.transaction() as tx:
        if not tx.run(
            "UPDATE credentials SET confirmed_at = %s, last_step = %s, updated_at = %s"
            " WHERE user_id = %s AND type = 'totp' AND secret = %s AND confirmed_at IS NULL",
            (now, step, now, user_id, secret),
        ):
            return False
        tx.run("DELETE FROM mfa_recovery_codes WHERE user_id = %s", (user_id,))
        for code_hash in code_hashes:
            tx.run(
                "INSERT INTO mfa_recovery_codes (code_hash, user_id, created_at)"
                " VALUES (%s, %s, %s)",
                (code_hash, user_id, now),
            )
    return True


def claim_totp_step(sql: SqlStore, user_id: int, step: int) -> bool:
    """Record that a code of `step` was used, if no code of it or a later step was: of two
    requests with the same code, one gets True."""
    return (
        sql.run(
            "UPDATE credentials SET last_step = %s WHERE user_id = %s AND type = 'totp'"
            " AND confirmed_at IS NOT NULL AND (last_step IS NULL OR last_step < %s)",
            (step, user_id, step),
        )
        > 0
    )


def use_recovery_code(sql: SqlStore, user_id: int, code_hash: str) -> bool:
    """Use one of the user's recovery codes up; True if it was there."""
    return (
        sql.run(
            "DELETE FROM mfa_recovery_codes WHERE user_id = %s AND code_hash = %s",
            (user_id, code_hash),
        )
        > 0
    )


def count_recovery_codes(sql: SqlStore, user_id: int) -> int:
    """How many unused recovery codes the user has."""
    row = sql.one("SELECT count(*) FROM mfa_recovery_codes WHERE user_id = %s", (user_id,))
    return int(row[0]) if row else 0


def delete_totp(sql: SqlStore, user_id: int) -> bool:
    """Switch two-factor sign-in off: the secret and the recovery codes go; True if there
    was a secret (confirmed or pending)."""
    with sql.transaction() as tx:
        deleted = tx.run("DELETE FROM credentials WHERE user_id = %s AND type = 'totp'", (user_id,))
        tx.run("DELETE FROM mfa_recovery_codes WHERE user_id = %s", (user_id,))
    return deleted > 0


# -- chat usage ------------------------------------------------------------------------------


def add_chat_usage(
    sql: SqlStore,
    day: str,
    who: tuple[str, int | None, str],
    model: tuple[str, str],
    prompt_tokens: int,
    completion_tokens: int,
    estimated: bool,
) -> None:
    """Count one answer's tokens into its day's row for (owner, user id, address) and
    (provider, model): one upsert."""
    owner, user_id, address = who
    sql.run(
        "INSERT INTO chat_usage (day, owner, user_id, address, provider, model, requests,"
        " prompt_tokens, completion_tokens, estimated)"
        " VALUES (%s, %s, %s, %s, %s, %s, 1, %s, %s, %s)"
        " ON CONFLICT (day, owner, address, provider, model) DO UPDATE SET"
        " requests = chat_usage.requests + 1,"
        " prompt_tokens = chat_usage.prompt_tokens + excluded.prompt_tokens,"
        " completion_tokens = chat_usage.completion_tokens + excluded.completion_tokens,"
        " estimated = chat_usage.estimated + excluded.estimated",
        (day, owner, user_id, address, *model, prompt_tokens, completion_tokens, int(estimated)),
    )


def day_usage_totals(sql: SqlStore, day: str) -> list[tuple[str, int | None, str, int]]:
    """A day's tokens by (owner, user id, address): what rebuilds the budget counters."""
    rows = sql.all(
        "SELECT owner, user_id, address, sum(prompt_tokens + completion_tokens) FROM chat_usage"
        " WHERE day = %s GROUP BY owner, user_id, address",
        (day,),
    )
    return [(str(o), None if u is None else int(u), str(a), int(t)) for o, u, a, t in rows]


def list_user_usage(sql: SqlStore, user_id: int) -> list[tuple]:
    """An account's usage rows, newest day first: (day, provider, model, requests,
    prompt_tokens, completion_tokens, estimated)."""
    return sql.all(
        "SELECT day, provider, model, sum(requests), sum(prompt_tokens), sum(completion_tokens),"
        " sum(estimated) FROM chat_usage WHERE user_id = %s"
        " GROUP BY day, provider, model ORDER BY day DESC, provider, model",
        (user_id,),
    )


# The usage report's groupings: what to group by, and how to show it.
USAGE_GROUPS = {
    "day": ("c.day", "c.day"),
    "model": ("c.provider || ' ' || c.model", "c.provider, c.model"),
    "user": (
        "COALESCE(u.email, CASE WHEN c.owner = '' THEN '(no history kept)'"
        " ELSE 'anonymous ' || substr(c.owner, 9, 8) END)",
        "COALESCE(u.email, CASE WHEN c.owner = '' THEN '(no history kept)'"
        " ELSE 'anonymous ' || substr(c.owner, 9, 8) END)",
    ),
}


def usage_report(sql: SqlStore, since_day: str, by: str) -> list[tuple]:
    """Usage since a day (inclusive), grouped by day, model or user: (what, requests,
    prompt_tokens, completion_tokens, estimated), the largest first (by day: in order)."""
    shown, grouped = USAGE_GROUPS[by]
    order = "1" if by == "day" else "sum(c.prompt_tokens + c.completion_tokens) DESC, 1"
    return sql.all(
        f"SELECT {shown}, sum(c.requests), sum(c.prompt_tokens), sum(c.completion_tokens),"
        f" sum(c.estimated) FROM chat_usage c LEFT JOIN users u ON u.id = c.user_id"
        f" WHERE c.day >= %s GROUP BY {grouped} ORDER BY {order}",
        (since_day,),
    )


# -- the audit log and the cleanup job ------------------------------------------------------


def insert_auth_event(
    sql: SqlStore,
    event: str,
    user_id: int | None,
    detail: str = "",
    ip: str = "",
    user_agent: str = "",
    request_id: str = "",
) -> None:
    """Append one event to the audit log."""
    sql.run(
        "INSERT INTO auth_events (created_at, user_id, event, detail, ip, user_agent, request_id)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s)",
        (utcnow(), user_id, event, detail, ip, user_agent, request_id),
    )


def list_auth_events(
    sql: SqlStore, user_id: int | None, since: dt.datetime, limit: int
) -> list[tuple]:
    """Audit events since a time, of one account (or of all when user_id is None), oldest
    first: (created_at, user_id, event, detail, ip, user_agent, request_id)."""
    columns = "created_at, user_id, event, detail, ip, user_agent, request_id"
    if user_id is None:
        rows = sql.all(
            f"SELECT {columns} FROM auth_events WHERE created_at >= %s"
            " ORDER BY created_at DESC, id DESC LIMIT %s",
            (since, limit),
        )
    else:
        rows = sql.all(
            f"SELECT {columns} FROM auth_events WHERE user_id = %s AND created_at >= %s"
            " ORDER BY created_at DESC, id DESC LIMIT %s",
            (user_id, since, limit),
        )
    return rows[::-1]


CLEANUP_LOCK_KEY = SCHEMA_LOCK_KEY + 1  # pg_try_advisory_xact_lock key of the cleanup job
CLEANUP_BATCH = 500

# What the cleanup job deletes, table by table, a batch at a time (by key, so that no
# statement holds many row locks for long); the parameters: now, the idle cutoff, the
# audit cutoff, the batch size, the audit cutoff as a day.
_CLEANUP_STEPS = (
    (
        "sessions",
        "DELETE FROM sessions WHERE id_hash IN (SELECT id_hash FROM sessions"
        " WHERE expires_at < %s OR revoked_at IS NOT NULL"
        " OR COALESCE(last_seen_at, created_at) < %s LIMIT %s)",
        (0, 1, 3),
    ),
    (
        "password_resets",
        "DELETE FROM password_resets WHERE token_hash IN"
        " (SELECT token_hash FROM password_resets WHERE expires_at < %s LIMIT %s)",
        (0, 3),
    ),
    (
        "email_tokens",
        "DELETE FROM email_tokens WHERE token_hash IN"
        " (SELECT token_hash FROM email_tokens WHERE expires_at < %s LIMIT %s)",
        (0, 3),
    ),
    (
        "auth_events",
        "DELETE FROM auth_events WHERE id IN"
        " (SELECT id FROM auth_events WHERE created_at < %s LIMIT %s)",
        (2, 3),
    ),
    (
        "chat_usage",
        "DELETE FROM chat_usage WHERE (day, owner, address, provider, model) IN"
        " (SELECT day, owner, address, provider, model FROM chat_usage WHERE day < %s LIMIT %s)",
        (4, 3),
    ),
)


def delete_expired_rows(
    sql: SqlStore, idle: dt.timedelta, retention: dt.timedelta, batch: int = CLEANUP_BATCH
) -> dict[str, int] | None:
    """Delete ended sessions (expired, revoked, idle), expired links and audit rows past
    their retention, in batches; rows deleted per table, or None when another process holds
    the cleanup lock (it is doing the same)."""
    now = utcnow()
    values = (now, now - idle, now - retention, batch, (now - retention).strftime("%Y-%m-%d"))
    deleted = dict.fromkeys((name for name, _, _ in _CLEANUP_STEPS), 0)
    for name, statement, picks in _CLEANUP_STEPS:
        while True:
            with sql.transaction() as tx:
                if not sql.try_lock(tx, CLEANUP_LOCK_KEY):
                    return None
                count = tx.run(statement, tuple(values[i] for i in picks))
            deleted[name] += count
            if count < batch:
                break
    return deleted


###############################################################################
# Key-value store
###############################################################################


class KeyValueStore:
    """The few Redis commands CloudChat needs, with errors as StoreUnavailable."""

    # Whether other processes (more instances, the command line) see the same keys.
    shared = False

    def get(self, key: str) -> str | None:
        """The value of a key, or None."""
        raise NotImplementedError

    def set(self, key: str, value: str, ttl: int, only_if_absent: bool = False) -> bool:
        """Set a key that expires after `ttl` seconds; with only_if_absent, only if it does
        not exist (SET NX). True if it was set."""
        raise NotImplementedError

    def set_many(self, items: Sequence[tuple[str, str]], ttl: int) -> None:
        """Set several keys, each to its value, expiring after `ttl` s, in one round trip."""
        raise NotImplementedError

    def replace(self, key: str, expected: str, value: str, ttl: int) -> bool:
        """Set a key only while it still holds `expected`; True if it was set."""
        raise NotImplementedError

    def delete(self, *keys: str) -> int:
        """Delete keys; return how many existed."""
        raise NotImplementedError

    def overwrite_unless(self, items: Sequence[tuple[str, str, int]], unless: str) -> None:
        """Set each (key, value, ttl) unless the key holds `unless` now (checked and set as
        one step per key), in one round trip."""
        raise NotImplementedError

    def get_list(self, key: str) -> list[str]:
        """The items of a list, oldest first (none if it does not exist)."""
        raise NotImplementedError

    def get_many(self, keys: Sequence[str]) -> list[str | None]:
        """The values of several keys (None where there is none), in one round trip."""
        raise NotImplementedError

    def add_many(self, amounts: Sequence[tuple[str, int]], ttl: int) -> None:
        """Add to several counters (made at 0 where missing) and let each expire `ttl`
        seconds from now, in one round trip."""
        raise NotImplementedError

    def hit_many(
        self, windows: Sequence[tuple[str, int, int]], read_list: str | None = None
    ) -> tuple[list[tuple[int, int]], list[str]]:
        """Count one event in each fixed window (key, seconds, limit), which starts at its
        first event, in order, up to the first window whose count goes over its limit: the
        windows after it are not counted (an attempt refused by its address's limit costs
        an account nothing, and makes no key for each identifier it names).

        Returns (count, seconds left) per window, in order; for a window not counted, what
        the count would have been if it exists (so Retry-After covers it too), else (0, 0).
        With read_list=key, also every item of that list, oldest first (else []). All in
        one round trip: a request's limits cost one wait, not one each.
        """
        raise NotImplementedError

    def add_to_windows(self, key_now: str, key_before: str, amount: int, ttl: int) -> int:
        """Add amount to key_now (created with expiry ttl); return its new total plus the
        value of key_before, in one round trip: a budget over two fixed windows."""
        raise NotImplementedError

    def append_list(self, key: str, items: list[str], keep: int, ttl: int) -> None:
        """Append items in one step, keep only the newest `keep`, expire after `ttl` s."""
        raise NotImplementedError

    def ping(self) -> None:
        """Raise StoreUnavailable unless the store answers."""
        raise NotImplementedError

    def close(self) -> None:
        """Release connections."""


class RedisSentinel(NamedTuple):
    """Where Redis Sentinel says which server is the primary: its addresses, the name of the
    primary it watches, and the sentinels' own password (if any)."""

    addresses: tuple[tuple[str, int], ...]
    master: str
    password: str = ""


class BlockingSentinelConnectionPool(
    redis.sentinel.SentinelConnectionPool, redis.BlockingConnectionPool
):
    """The primary's pool through Sentinel: waits for a free connection, as REDIS_URL's
    does, instead of failing a burst with "Too many connections"."""


def sentinel_master_client(
    url: str, pool_size: int, sentinel: RedisSentinel, options: dict[str, Any]
) -> redis.Redis:
    """A client of the primary the sentinels name, following it through a failover; the
    username, password, database and TLS of REDIS_URL (if set) apply to it."""
    target: dict[str, Any] = {}
    if url:
        parsed = redis.connection.parse_url(url)
        target = {k: v for k, v in parsed.items() if k in ("username", "password", "db")}
        if parsed.get("connection_class") is redis.SSLConnection:
            target["ssl"] = True
    watchers = redis.sentinel.Sentinel(
        list(sentinel.addresses),
        sentinel_kwargs={
            "password": sentinel.password or None,
            "socket_timeout": options["socket_timeout"],
            "socket_connect_timeout": options["socket_connect_timeout"],
        },
    )
    return watchers.master_for(
        sentinel.master,
        connection_pool_class=BlockingSentinelConnectionPool,
        max_connections=pool_size,
        timeout=2 * options["socket_timeout"],  # as the REDIS_URL pool waits
        **target,
        **options,
    )


def redis_client(
    url: str, pool_size: int, sentinel: RedisSentinel | None, options: dict[str, Any]
) -> redis.Redis:
    """A client with a pool of at most pool_size connections to REDIS_URL or to the primary
    the sentinels name."""
    if sentinel is not None:
        return sentinel_master_client(url, pool_size, sentinel, options)
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=pool_size,
        # Waiting for a free connection is waiting for other requests, which a busy event
        # loop (500 chat streams starting at once) can delay past REDIS_TIMEOUT while Redis
        # is fine. A hung Redis frees every connection within REDIS_TIMEOUT, so twice that
        # still bounds the wait.
        timeout=2 * options["socket_timeout"],
        **options,
    )
    return redis.Redis(connection_pool=pool)


class RedisStore(KeyValueStore):
    """Redis through a bounded connection pool; every key carries the configured prefix."""

    shared = True

    def __init__(
        self,
        url: str,
        prefix: str,
        timeout: float,
        pool_size: int,
        ca_file: str = "",
        sentinel: RedisSentinel | None = None,
    ) -> None:
        self._prefix = prefix
        # One immediate retry on a dropped connection (a restarted Redis), none on a timeout:
        # a hung Redis must cost one timeout, not several.
        retry = redis.retry.Retry(
            redis.backoff.NoBackoff(), 1, supported_errors=(redis.ConnectionError,)
        )
        options: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry": retry,
            "decode_responses": True,
        }
        if ca_file and url.startswith("rediss://"):
            options["ssl_ca_certs"] = ca_file  # a private CA; the host name is checked too
        self._client = redis_client(url, pool_size, sentinel, options)
        # The health check's own connection: behind a burst of chats the pool's queue is
        # other requests, not an outage, and a load balancer's check must not wait in it.
        self._ping_client = redis_client(url, 1, sentinel, options)
        self._hit_many = self._client.register_script(self._HIT_MANY)
        self._overwrite_unless = self._client.register_script(self._OVERWRITE_UNLESS)

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except redis.RedisError as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc

    def get(self, key: str) -> str | None:
        with self._errors():
            return self._client.get(self._prefix + key)

    def set(self, key: str, value: str, ttl: int, only_if_absent: bool = False) -> bool:
        with self._errors():
            return bool(
                self._client.set(self._prefix + key, value, ex=max(1, ttl), nx=only_if_absent)
            )

    def set_many(self, items: Sequence[tuple[str, str]], ttl: int) -> None:
        if not items:
            return
        with self._errors():
            pipe = self._client.pipeline(transaction=False)
            for key, value in items:
                pipe.set(self._prefix + key, value, ex=max(1, ttl))
            pipe.execute()

    def replace(self, key: str, expected: str, value: str, ttl: int) -> bool:
        full = self._prefix + key
        with self._errors(), self._client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(full)  # the MULTI below fails if anyone writes the key first
                if pipe.get(full) != expected:
                    return False
                pipe.multi()
                pipe.set(full, value, ex=max(1, ttl))
                pipe.execute()
            except redis.WatchError:
                return False
            return True

    def delete(self, *keys: str) -> int:
        if not keys:
            return 0
        with self._errors():
            return int(self._client.delete(*(self._prefix + key for key in keys)))

    # KEYS: the counters, then optionally a list to read; ARGV: window and limit of each.
    # SET NX EX creates a window with its expiry and INCR keeps it; a script runs whole, so
    # no counter is ever left without its TTL, and counting stops at the first one over.
    _HIT_MANY = """
local out, over = {}, false
for i = 1, #ARGV / 2 do
  if over then
    local count = tonumber(redis.call('GET', KEYS[i]) or '0')
    out[#out + 1] = count > 0 and count + 1 or 0
    out[#out + 1] = count > 0 and redis.call('TTL', KEYS[i]) or 0
  else
    redis.call('SET', KEYS[i], 0, 'EX', ARGV[2 * i - 1], 'NX')
    local count = redis.call('INCR', KEYS[i])
    out[#out + 1] = count
    out[#out + 1] = redis.call('TTL', KEYS[i])
    over = count > tonumber(ARGV[2 * i])
  end
end
local items = {}
if #KEYS > #ARGV / 2 then items = redis.call('LRANGE', KEYS[#KEYS], 0, -1) end
return {out, items}
"""

    def hit_many(
        self, windows: Sequence[tuple[str, int, int]], read_list: str | None = None
    ) -> tuple[list[tuple[int, int]], list[str]]:
        keys = [self._prefix + key for key, _, _ in windows]
        if read_list is not None:
            keys.append(self._prefix + read_list)
        args = [number for _, window, limit in windows for number in (window, limit)]
        with self._errors():
            out, items = self._hit_many(keys=keys, args=args)
        counts = [
            (int(out[2 * i]), max(1, int(out[2 * i + 1])) if out[2 * i] else 0)
            for i in range(len(windows))
        ]
        return counts, list(items)

    def add_to_windows(self, key_now: str, key_before: str, amount: int, ttl: int) -> int:
        now, before = self._prefix + key_now, self._prefix + key_before
        with self._errors():
            pipe = self._client.pipeline(transaction=True)
            pipe.set(now, 0, ex=ttl, nx=True)
            pipe.incrby(now, amount)
            pipe.get(before)
            replies = pipe.execute()
        return int(replies[1]) + int(replies[2] or 0)

    _OVERWRITE_UNLESS = """
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) ~= ARGV[1] then
    redis.call('SET', KEYS[i], ARGV[2 * i], 'EX', ARGV[2 * i + 1])
  end
end
"""

    def overwrite_unless(self, items: Sequence[tuple[str, str, int]], unless: str) -> None:
        if not items:
            return
        args: list[Any] = [unless]
        for _, value, ttl in items:
            args += [value, max(1, ttl)]
        with self._errors():
            self._overwrite_unless(keys=[self._prefix + key for key, _, _ in items], args=args)

    def get_list(self, key: str) -> list[str]:
        with self._errors():
            return list(self._client.lrange(self._prefix + key, 0, -1))

    def get_many(self, keys: Sequence[str]) -> list[str | None]:
        if not keys:
            return []
        with self._errors():
            return list(self._client.mget([self._prefix + key for key in keys]))

    def add_many(self, amounts: Sequence[tuple[str, int]], ttl: int) -> None:
        if not amounts:
            return
        with self._errors():
            pipe = self._client.pipeline(transaction=False)
            for key, amount in amounts:
                pipe.incrby(self._prefix + key, amount)
                pipe.expire(self._prefix + key, ttl)
            pipe.execute()

    def append_list(self, key: str, items: list[str], keep: int, ttl: int) -> None:
        full = self._prefix + key
        with self._errors():
            # One RPUSH of all items and the trim in one MULTI: concurrent appends
            # interleave whole groups, never single items.
            pipe = self._client.pipeline(transaction=True)
            pipe.rpush(full, *items)
            pipe.ltrim(full, -keep, -1)
            pipe.expire(full, ttl)
            pipe.execute()

    def ping(self) -> None:
        with self._errors():
            self._ping_client.ping()

    def close(self) -> None:
        self._client.connection_pool.disconnect()
        self._ping_client.connection_pool.disconnect()


class MemoryStore(KeyValueStore):
    """An in-process stand-in for Redis with real expiry; serves a single process only."""

    _SWEEP_EVERY = 1024

    def __init__(self) -> None:
        self._data: dict[str, tuple[Any, float]] = {}
        self._lock = threading.Lock()
        self._writes = 0

    def _live(self, key: str, now: float) -> tuple[Any, float] | None:
        entry = self._data.get(key)
        if entry is not None and entry[1] <= now:
            del self._data[key]
            return None
        return entry

    def _wrote(self, now: float) -> None:
        # Expired keys nobody reads again would pile up: sweep now and then.
        self._writes += 1
        if self._writes % self._SWEEP_EVERY == 0:
            for key in [k for k, (_, deadline) in self._data.items() if deadline <= now]:
                del self._data[key]

    def get(self, key: str) -> str | None:
        with self._lock:
            entry = self._live(key, time.monotonic())
            return None if entry is None else str(entry[0])

    def set(self, key: str, value: str, ttl: int, only_if_absent: bool = False) -> bool:
        now = time.monotonic()
        with self._lock:
            if only_if_absent and self._live(key, now) is not None:
                return False
            self._data[key] = (value, now + max(1, ttl))
            self._wrote(now)
            return True

    def set_many(self, items: Sequence[tuple[str, str]], ttl: int) -> None:
        for key, value in items:
            self.set(key, value, ttl)

    def replace(self, key: str, expected: str, value: str, ttl: int) -> bool:
        now = time.monotonic()
        with self._lock:
            entry = self._live(key, now)
            if entry is None or entry[0] != expected:
                return False
            self._data[key] = (value, now + max(1, ttl))
            return True

    def delete(self, *keys: str) -> int:
        now = time.monotonic()
        with self._lock:
            return sum(1 for key in keys if self._live(key, now) and self._data.pop(key))

    def hit_many(
        self, windows: Sequence[tuple[str, int, int]], read_list: str | None = None
    ) -> tuple[list[tuple[int, int]], list[str]]:
        now = time.monotonic()
        counts = []
        items: list[str] = []
        over = False
        with self._lock:
            for key, window, limit in windows:
                entry = self._live(key, now)
                if over:
                    # Not counted; what this attempt would have made of it, if it exists.
                    counts.append(
                        (entry[0] + 1, max(1, math.ceil(entry[1] - now))) if entry else (0, 0)
                    )
                    continue
                count, deadline = (1, now + window) if entry is None else (entry[0] + 1, entry[1])
                self._data[key] = (count, deadline)
                self._wrote(now)
                counts.append((count, max(1, math.ceil(deadline - now))))
                over = count > limit
            if read_list is not None:
                entry = self._live(read_list, now)
                if entry is not None:
                    items = list(entry[0])
        return counts, items

    def add_to_windows(self, key_now: str, key_before: str, amount: int, ttl: int) -> int:
        now = time.monotonic()
        with self._lock:
            entry = self._live(key_now, now)
            total, deadline = (
                (amount, now + ttl) if entry is None else (entry[0] + amount, entry[1])
            )
            self._data[key_now] = (total, deadline)
            self._wrote(now)
            before = self._live(key_before, now)
            return total + (before[0] if before is not None else 0)

    def overwrite_unless(self, items: Sequence[tuple[str, str, int]], unless: str) -> None:
        now = time.monotonic()
        with self._lock:
            for key, value, ttl in items:
                entry = self._live(key, now)
                if entry is None or entry[0] != unless:
                    self._data[key] = (value, now + max(1, ttl))

    def get_list(self, key: str) -> list[str]:
        with self._lock:
            entry = self._live(key, time.monotonic())
            return list(entry[0]) if entry else []

    def get_many(self, keys: Sequence[str]) -> list[str | None]:
        return [self.get(key) for key in keys]

    def add_many(self, amounts: Sequence[tuple[str, int]], ttl: int) -> None:
        now = time.monotonic()
        with self._lock:
            for key, amount in amounts:
                entry = self._live(key, now)
                self._data[key] = (str(int(entry[0] if entry else 0) + amount), now + max(1, ttl))
                self._wrote(now)

    def append_list(self, key: str, items: list[str], keep: int, ttl: int) -> None:
        now = time.monotonic()
        with self._lock:
            entry = self._live(key, now)
            kept = ([*entry[0], *items] if entry else list(items))[-keep:] if keep > 0 else []
            self._data[key] = (kept, now + ttl)
            self._wrote(now)

    def ping(self) -> None:
        return None


def open_kv_store(cfg: Config) -> KeyValueStore:
    """Redis when configured, else the in-process store."""
    if not cfg.uses_redis:
        return MemoryStore()
    sentinel = None
    if cfg.redis_sentinels:
        sentinel = RedisSentinel(
            cfg.redis_sentinels, cfg.redis_sentinel_master, cfg.redis_sentinel_password
        )
    return RedisStore(
        cfg.redis_url,
        cfg.redis_key_prefix,
        cfg.redis_timeout,
        cfg.redis_pool_size,
        cfg.redis_ca_file,
        sentinel,
    )


###############################################################################
# Security: input rules, password hashing, tokens, rate limits, client address
###############################################################################

# API.md "Emails": an ASCII dot-atom local part and a domain of LDH labels (an IDNA domain
# in its xn-- form). Nothing else: a comma or a semicolon would make smtplib mail a second
# recipient, and look-alike characters would make look-alike accounts.
_EMAIL_ATOM = r"[a-z0-9!#$%&'*+/=?^_`{|}~-]+"
_EMAIL_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
EMAIL_RE = re.compile(rf"{_EMAIL_ATOM}(?:\.{_EMAIL_ATOM})*@{_EMAIL_LABEL}(?:\.{_EMAIL_LABEL})+")
EMAIL_LOCAL_MAX = 64
EMAIL_MAX = 254
_ASCII_BLANKS = " \t\r\n\f\v"
PHONE_RE = re.compile(r"\+?[0-9][0-9 \-]*")
PASSWORD_MIN, PASSWORD_MAX = 8, 128
DISPLAY_NAME_MAX = 64

# The 10,000 most common passwords of the zxcvbn package's list (MIT licence; from Mark
# Burnett's and Xato's collections of leaked passwords), lower-cased, those of 8 to 128
# characters only (shorter ones fail the length rule anyway): sorted, one a line, zlib,
# base85. Decoded once, on first use.
COMMON_PASSWORDS_BLOB = (
    "c-mE+$(F1*m!;>t#Xrbl)pEmHUpc8a$webTMk5>vGsm93_TEDH&4{=WpMg-X)2NI8{1l)3?SHfX`mee0{_V1_|Es^hzO"
    "t|5FFZYcolf6;C^#j!Cb%7N+Tos_+>a-Df^&jPf@^|Xf_s8Tg6|z3DdtCt`H^CNq?jKm=0}S8kz#(Nm>((TM~eA7#r&O"
    "O{!TG}r<lJ}%-<>I@A!HCwbu{ew8JSqIq6CMb^f{>@TCayl<YZW_MEbIPFcI8SC{namI`!BpWoAyNBZhJmGygna?1BG0"
    ">*Q>Kdw1H|IQ!h`{jm2^3-N|YM4A#dY&phPnDjhO3zcJ=c&^3ROxxD^gLC1o+>?O>0?@X>=qGj2~wCx3KJ8}Q=)lFG*5"
    "}<DbYM7nx{nbe-iyxan7-uMmQ(9B)BHHCwL_I-r<oxk2yT29G+9g&M9N(l(BQl*g0kFoHBNagCxQ^!6m^p!7af(!6QM6"
    "CuZ!DGImKByQHeSq#RyS4lgN(mz2Xx%HbvD@S1AunzDLLS-qwlUQ-UQDTmjT!)waeHD&CYGImWFyQYj?Q^u|-W7m|iYs"
    "%O)W$czZ(k*4|ma6WS@^ef1xutB}QtG#q`Yok?OR3*d>bI2oEv0@-sozuT_f!e@l;}N`{hnIqo>IT3O1P(N+*3C0DI52"
    "c`aPw7PpRKi>W|bYkJJ{ARQ5;8#v_&eky3x8L?0>9M@saO%Kk{HKT_(Cl=>s3{+-JHol^f!mGGTX|4ylYr_{ew*}qfj-"
    "zoL)l=^o{{X3<;OR^j?HKrxFCAcR@VU&a*1y&M*Yl8IoBYmy{3J}jZjofn@AOdQL^Vb8i9#1Z5q+HUgYwEq%)M>A&uij"
    "FRx}EFoxo+9lU47%e!$a^LWz-`HkVneKgYm>yds{q`Tz_1{=ksH;uWyFA;44ISyI#)u=_mVg-}bTIx9s$_OXdiO3V?E)"
    "zeG_g0b;%Z_Z{}iilEP;8av=B{60S}_XDo@fC*720`^Exdm&DzeVm<=-a74n33B`;_`zR<SkU<9d_I80|6VQ!T(AG&jo"
    ";+w>*I7jAV(5OHJy@{I3<C7N^<&?gbmWp_gAN=K=7aQ>2kUra6&TqS^p6D_YVPS;om!5uD6|j-iCDfis>MyF;nNuRSg$"
    "$|MJ3SJYWy@58h7s0s9BHe_#KvANPBL#{u7e^z{$^%f&zZ^ACUi`1B9{^XXrn@Z+D9j{f=g=$}N2vikc`|6%`!!yk@+I"
    "Q^mf!}$;Y$$e^t^kWIz-|yuQ{U5&m@UQ59`92~)3VOUN4mtv@J3LaGd>?d#F3JN^jTHWXR5L$62ORW1!2Ho)5tlvnBi<"
    "u6I0ieUFZtmgg?}){#-<b;eHXFD*br+Y=uICJIwD)lJ7)ItTd7`;v3W+%i2YNb%4FqS4mcg8gb`*RTwU|5`_o1BI2OKB"
    "J&tQ#D9xXry*nZkf3$xJid8G9{|Ncpf5fsMB_CYX8wUJ&^N-+sQSpA>h5!5t_Q3ueE;D7*dACAO=Ok#(yWO?JgAg?Zq{"
    "}XP&iUnhz1#%X`;B2P=w~qELDzeJ(IdRMu=4@FzaF<seEEI66@5jFuP?g+y~B-glO}^)+qK2zo?jp5Klsj~`w$-q;-l{"
    "yCDjh6gBbhc!9UsQngs7PC4AjY!U(LGYtlE@)AaisQR&x9emk>ETw!0F)pQ~?-7V>s+pcI&w^Q^1PWP1BJ<0O>Zo{4K@"
    "o$c_M+)`Wohm>yMNZVP4+_{vem~#X+a4G6O4yljilbRbr+A0xN@agO6?E}Q`uJ4j#ksf?2V8~axw_N`Tn*8m>q~RMwFP"
    "?LxdAWB!ke;y<ZGM@g6_9;KP__eG}B}ogc(d2jfET>ZPgWKAPj?be6spbOo%Xg{L2Bz!cYEl{<-`R-e+@J4!HhN_y=$3"
    "(?3Q2_GgX&$c+C;Zlqa-1bAEhuOFACdFjEgf9D4r!9K+gdcqH%EEw*;`KNCm7+IhE7d7-c;96$+*FJvouf1_;k|p^52h"
    "f?R@71UBFFzMk@3TBj0OY3>PjbK`pdaL?6mv9N5YK7vn|bnS^W=Hv$<NG_6PPE5Do+koF3$ntD^K?QVYB4<<#M|*%sEA"
    "v<O0l!`>lT3S1~n<L)Oo}x3zOwe%XEQ{IUy-JPul90t21%4-q)tv;3M0dQI86?v^Crdw;bL9SroZFG?2z|77_sRnKkj`"
    "FR>l`Tc&z2mz#_1c*{@hn%pN<~wEjdmpcW=>8l%hM=x+PG%_}8sX=!-M~JlIUQMG-#K38Cn${X#{qZIUH{5pEZ%N6&e@"
    "#L%d>mdK7;(AD$6qnFqDycgIeX9i&AezXnz`t`;W;kXp-9<q74??IY(yzj72-GV|KZYdF`&H&n^!dgpg4QAZHnoN_I{C"
    "?|LoUA{apD*ZZ}fUC6GXEpJ;lW!LwT+k5xOkmD1xo!#zLF&2x<ZjS`tG(PhSV1IHyL%KqWW>An{n%)6OPYSLS#w5J@z8"
    "%0vdCouCJ^oc>QK6#uBsl-kSGLRd%K=x>^`dayQcrKf+Sb?3&iON=HHk(<cR(<--xuuA@9gosZ05Xvvd7#l?)|wT2M1o"
    "V@6#!)OX&bf_<qB)fP+-Rn3rCWB>+M>M6?H_c@FEc$o_GJzTq%xuCCZEumc`{^qsH(L}7hEaRrun1;KoP;WMAt=jL)ii"
    ")VW*03h9(BK}2K>Q}M!8LT7)I^agCi2~EK2wj?`Hf93Ywy*=AOl}z={flxbs-ot9#C_tbnAf3lfXaA}hKhi$4{+-g5J}"
    "ZREui}qm95KlLHu?59Ov)`jCNvEMtEE~a&r7y%v21PAzx-f+hm1-I2vs@pvwwKsM-c(qD2_Ekbub=|LO6_qB)nz5E{2s"
    "f_W(Tq%VSBdz%$QQKB~^gF{&aO1omH08lQ)V4lTPFNEHM%pd+k1<?}^z}Nu(#)<{-+XI$U!sUSDEzIO%XfU`&K5ES}L6"
    "M>oFmxS*_pA`U8p@%ldV<-IU&0Y+u-;8fWteQ+=^YgD;&%xAe(nlYIiWNm!dNh|U>4J&1Q_FJGC?paKOaj}kVSz<v)GE"
    "2Hk#0F9-ohHF{5Q*kMHZ^fH5nkqH+@-O+}vo`SA9DP0xZG?3SrMVBiW+5A^{IRBx`%`K~pC3P7O15}3_Iu)#%e%^S9OF"
    "?E|+4f8S;`Hekv3I@em1cRITUFh7jof6~;?gZPqNnzY%ox(WZv5&dIuNCBLF*{Ti$6W+uZJr02{es!z^Pjb7>{JMb6{Z"
    "nku`51b&<w+XS4*Xg6FSlX@sSOt0<gDpXe`KAv7!MM`vD<&4As`uHTzA(NFJS=;5n#H2^z)~_Db?eDENAp69PIX_!EDS"
    "n%J=ca<}-eruK!PO<~$2il*(pPCGpN0|pWP``-fjX#}}vfZb;*{OD@K8uGJU)cG;Syl3He;5%Op?yW~OT~7)0YH%;b?Z"
    "<VhATrS9hT>&Cr3O2x<*4^)*_TD80t7^0MG7olg~iyKQLQa3S|+UjoKFYbL<<IIR=g0olG(wKrWQgtE8fPVBjdXdy|mR"
    "H;AWuztt;sN5<P)R{s0V5;<7^C0akT9z*ZVGn_yUtpep(ZH9Dc7DXRFSwM%?5xaqpXi?6D_WZx#h$Xf(38Y%$fyG1Vr^"
    "z2LolnIs$U@D5SgQx&M5vX8(hZ=IBCk)O_Uf_%PB-l}r&mF3OC4w@6qb%rmK(x+BSkMIccZI<@9iTv_j4>{zF)<=T|Ac"
    "^HuaYc^`v86BQv~v9P6>ts^r$y*bPmu<h|Zet0>mT4Qdw-2!7R%5E&^J*tQu<u){23eD`A|mVIY<DB%l|b2y3v-3aENW"
    "+B?8BvAIx+PEBDtGdeahB|!^mTAHa==LJBusJ6}0_Qg08rjEU;G~V`*qJR*#(zyc=$hK+&fi#A|?ciMLcL<w6vP=+ypf"
    "2iKuWGdHDS=+KwQF0#h+0<|igUqiCaW;B9cL?W^IQm4?-d3^CuSoos{n;A+1NX@BC8?-P@pmazn_MpHVo~$;u8ZwHdpX"
    "lOS^=wF1FJ_7mzo<D;v~$C^n_%>8Tb6px!N-6LKO`RZ;o~jwfiB145!@*><$c0rgI9e@7J^!Bq$Jkx+{fy5fDn{?2mn3"
    "LrHE&!ReD4}{u^;O0G}ZdGzHHr7d96{Rax!a)*`aj`$uJ7|!jSNAY|37=S@7%+8Am@rZ5U|i2;VKVOBSl<br>PC=3QVf"
    "JRum}=Sg5$}uKZ(_}n%caq0O~u&v&X!`0Ndh|(XnR$Cg+X7(^?S(CgIAWLANK=+rU?@L_@PX?0}}AW>)8=83OaNcSH=k"
    "q85a1Z3!*ZEJL}r7&xAsLklupz#GOeVdNhG6gU15YK-w;g7xY<Zb4VKeB~==paWqn*T{ze1A7v9J21>ryqJ#z78GT%g$"
    "!c>l{)|i9cu#0ymFK)i*q%#H=!Rky$YS07@p0f&PAYURAQjPND@p=F|TD=Bp6If*(GAs7?t?y055=A4T86F3*kDW1qk&"
    "PBLb-36O{Z~53)l6Z(~`FJ0RC<)1Zn^37AIfOY~Ym@7^9JdbtimUA)@}u01920yqHil~)l7Xg$FjeHJjHJSAVDT{*7>_"
    "oIN?M!T-)`RM-CuKa<K!B!Gb(nAKCrCJY|cWQ<MHc=x128cb05EBYv9@wQen37wVvg$m$C9m_WqC%%;2e95ZKusxB0fq"
    "v;4WA4aW}XqiftdvD3YkTK5$*^u_d^8N)T_Rudk&!mC@ta=EVgb5P=oNt1i=}>!me1+xGwY+fP<@Ir-O79SZYIpEci;6"
    "aB&CBCeZQ%zzrKt3Ha6Qj9nObhFJjRpFp9#v=AT^R>?0AF-l`Gr^oqQAn`$H7Q?(QwCox6GTB!Q45wjY8p~`TtPU6>#p"
    ";6=fF&%T5*Nro!Kg<4!%QoLlY0q_Ixe7VAl?MjaR;!Dqo)T5QAGk8b#nm5pJgG#+r^4}u_+O_Ty9@qi{Lv#9j3n7nhXO"
    "I`VjVbWft0c$ea1F8zQ$2dc(LNOoyuS&=LSReh}J#ai*;(;H+!(72rMsVElv#EoC-=+E1V%zC#{?qCNpe@{Y&L<4KGO-"
    "6%u|N)~oaOauUrkzf#cu|LG{EEqk!L|Dp%#r14cz!Kv$7`Tg`L>&cqL2KyAYjOX8Vt;M^^hJ2XAgl-*x~BqdCIXz))|~"
    "{snGWy?ARyY)m!4zvtc=#q@Dh5#95dl6H>f-jR7uY958((k&#|Pt^cR%F6v1z&2*DN!_E%v{PhhVl=**7syUh>mJsrf%"
    "psHHw38MR3jL?zQZvzG>^KIe8P#;v!e)D#DX4O#8Z3+aaqw18v6V}=mda}`j2N*XOY@dO3&%Qg@y<`}A11&ZJbsPY?`2"
    "RpER#UT;Ro~QE<)FVVIpl(?3RV}Pr-yt13j&W$E(=1`Fn<@pj7$&)Qw2+KlwJbpO(*c41H%pQwb;NMUG%U3wxV*bOY*1"
    "*mmQqI)s#POoY!Ff041j$T@-q%783-19Tf;NZV9w1q2TxnU5{V50b*$q)T=&qgS;z3$B7^U6$=0&2(kx&u^<rw@h9Z~c"
    "$x5Z-$5zUl(7{7Rt6jaO`f6h!(w~B=RDZLN_s=Xa{LO|0!#7PpvEFd<}8L1!3YBV<_Ir=iA}l~Um;2WhXd8ZVn<CLRk5"
    "!^Nmk3VYs)86T`&M@_Bu!>+LnOLN0}e$rkbAZvxnGSD`;H4T`8HFT~w#$S}M3enh2?0Ww$+RNVH#k*O&16vkLAkoU~s6"
    "I@ZK)zO~cpe-S;^C;Mq#n7SCy1?r+{l$RQEovTa)S8~O)F07aM7L0`fK(G2d2XI2<#CRYh7q=2DCz1%0%of^(GDs6Jji"
    "uL2OoI4m;6fHbwkbhPPVlylp=F!a)IYDHKEUwV%T(+J0IP`=fomGTR<rT4x?HAbSAH@WmbEMk!i>Hp@H0dRAatDn5=;)"
    "=NCcA)K+Cj4anaryZv?(O0CEkubm(S;&$Pns-GS*gM$?{vpeCu!fc8@a5IZs5Wu_7)EOHTR_@nKluROXLhb{<RaML@Cq"
    "K!ET9Of^=;%wk6q+NBKU&vJNF?N6&lfZtx!-l?>q0^N;yl+4swyE3>z@zRty|%DD*D`~Q8#&J>fc<hxfC3@Qv1$QtV+b"
    "ZxP)&d~S~Tcq>{$ZNvNnP}@K|VrE^HUL!_de8=Zh7kw{!GxYdE2$RfJ23J=6M1ZhhT1Llm4MjEV!Eb@}_x50;4iTUFp{"
    "^j>xl0ptK3@fb4!T7w<S!P;HDV1^t)8t88@Ecs-ZI~rX(pc)`a;ZZ|Gb9IwH;lNjpU?)v0i!5Bg2<-8K9}FUh#(rXlgG"
    "c1ieF+#1@Yf-A!x+<E+fL&PfYHdb-xJktRxcR36SQ!I(*gMb=R^r^-#a`WJA9`nWpTg}Iq|b|GaRsq7S50nXmw;7da&*"
    "e2$85PcHq0`HZ=<e&En=-{RhyixiR!$8_s~)P;~;<F@7Jq=T^dyt3&^+$~GV?;dgsh6WVfxxoBAm=*T!8>1{a(_j+X(S"
    "r~XGv6<IEE6GPtpV+1%w(aLPs7Jwaj`KtGB|EO8B<MjtNJbIf@E`#JO^!AM#2Fex&F^9Dz?z=mGPRj$Tdtmj%+SuIKVZ"
    ";z0$2axs6*TrRF;|PDeP&K8;%<|)d08|^tjA`kyj3asMQVCJ(XSreve*ixMl>HJEccsgdM}c*U@qX;PVGipG@o(EiW^2"
    "v5C^kjL0NaxfxM60UE$eS_s0EsYQ?o6gh}{lGk^RpsFCiV>tkW$xKK^rCcb#1TdvM!P9eNrDAk1FvbBhG^{6h&g3Bsqo"
    "!|X=p)c7Gwa;JnnM0xFlnfc(HqHJ#W;YULSVG?f(V?(5&Wzy=MM2vp#C<m79)6Lv=E@|pyuTU=wD>!m)>K!9<Y#TXd{u"
    "|d2sATf`#?-t1_Ij=IbkHNHwRcDOyOF2F{@jZO$>v1#SvE_@dzx*h7V0^@h7X09<>5dTUVID3l{`?WfoQHeUp&2?8V%z"
    "gj$9On~202UJ|lYKj-?Ex<oXbUWyN&?9S%d>l_;r4wqcUjfX}viCQfaAn;zP+~B_kb^e#V+D=UbgyO&1MHs$17={`$<3"
    "<<C>Ac}412EeV~O)#0#0rT&?OEqB7QH>JRd<$DM9u^1Wq%N-YH6$gbeLFP1h4NeN3QUIA9WK-k%`tMxd`F2y_%0Sb{ON"
    "zTBR_5K2uya+ac*V2<HOSgK|lx<Asx4IVvUfE-jCa;jnnFF^!|vmni2er?HaGIU{MDj+)rPF4VBc-FIk>pKE@Qh2=Bx)"
    "7`~KIno=%QeHRgr6~W4a_3^+VB+ef8U&RN-!J{A8DBb!@fqx{fdw$IPbtIXo8UwLhwDr8sVi}Ik?cl20}mBMleF+>6J%"
    "2Fz|0DJqy^-*oX&SN`)~U!LkSu;uFm<3+Q<_5GeBQ0C7#8fR5S|_6`Mr+C3%61&zu~qh14zz&RGe%1JiD+r}`qGc3gdG"
    "1I{iZ&=sciP^wVu9ZVU(05Sm`6Z74iz9;7tJR{45fg^}|3C{+nUGBlg+++{k3hLZh`j>vPw>$|lSh!QBEkkf2{eyK2wj"
    "l?ZYN<gMHj)Xrvq4>5s~NhX&YFIfML*z5kaPUvrf@60!(t206we~PEfpdWFxGc7G#~R0qU2-YlUUW4F=8n`NUTnoEMm&"
    "AJX*f%OAi54G&|j+1Ah>@ce~K-4^9SXCuJ?7z!wnN>K9|$!I#HrPH$0XtY`&SW6?2{n%2L4h^H6+LC+i62LYksvQAOt?"
    "d)mvS5_^gkD=LTDu~&j%Fh_3B9>?vO}I}TLEQPTefAzd8oGRnpZghjKz2?k%WQ4&oM~w?CGt+kfF~;Qx#f&A|Ml+p1`L"
    "b9e@r3d^U`&IIRZoGz_!0X`2`R26WBvTq*+GOBjU-&O60_#~&X~vck};1I@<-=be~QL0yH{j!Ux)p>OzWFx^uj7PMuhc"
    "(!+_D!%Nx%e{NvZ<lZUfWcNyW@1f{pD73NhyK0)fRRXo;THqrN!dm~B7_xH`O>>rn8FXh(cP!ugO=$7Z9~-KG{8Otpzm"
    "x@&oEwKWH{6u#IZ&!=!Kz;(bw7!r#n#3=u{SscL1V<l1Gm*g6VCnKo(#-U2pu8!H>2uH1NdLS{))Zl<Eg8BtLRg5oQxZ"
    "f3%*~I`tTS2FpXOx`PolTy09AsEEE3Eb9)^O@#LzywR8=Nc9q=(Wt=V)@@;<fd$Zv41v301Oqp$3RYztIme(EaL@}jqh"
    "wu5&3U7d10CU}oJnv~Oz{B(t65cm>tdo|bCkd>S9fSP0%k+&1+cvx2Mp(6sJ;c9?Vw4AEXoWa$L>lfp@{@_0_B7dOhG_"
    "qIGkWV40PfE8#Rz%PY(V=oqs{VxBhoIaWfhXn^)M-tHKn$%y#A6JL858>E9hX%*sNpV+4#_!ldbq7E;to_CRJ1Y8${vh"
    "q>L(TgaDoK&WlxS};Ug$6Z*g%MOA{EkKYQ<|MXOp#<=!0d$l)!c^~H?TZmz5?KTZzpj{PnfZh*#sgq&MS!Cuh@USh!lj"
    "lpjj$L2y??=yUTI83SoCDsX2&%jF#l6{!4f}w7uLd*h@j-&aqVmeFF;pjobS+4KX=8(%^XG6)sQRG`&!@4=~dzz!(~F$"
    "H9_lbT{K-!3332j|BfYu`(<c;5C-~U?2NP*1+jh!_*aD9h67;D614zKkY4RH=>xZ=<DwT$67KVOb5j@%Ow0aD??tn$w5"
    "U6-X?7+=Rnl25ZNaYZVCTZS*aV$n`T$MvBw%$C)h{fv-RcQ6HtiLHOa&MMXvE7sLy6z;Vv!>^$Z{bJ=<JTL$ztICk`nn"
    "9j8t5NnF~M!`FI^yu`1|;2=>LEN)1%97YZ<r1hrzC+McsJ0C-Wu3UHhXVi@Nw<p3baOl9M0DpA0tJ%M^5#G?5Fwi+$fl"
    "2z=279|K2U3wBdaeyz@$_Qkp$j(&%rXBNE?IrR;If32sf{^La5@D6y{D!U4t+Hf2!IfMl?AD=|q0p_-2L^C1kNI4E9}B"
    "h3+$c3=mM!y~n+V)cY%8P5W<s>9>^>uOz&qpKkid;@7Nf?%Ldz^QU^753+QIgk78Xz_BIdE6^Z=}!ffC5?wlwFVYa&n;"
    "31sm`Qk@B7Q~;&7!|9+Lv}xaL1a2F*<LH(EF=NNM;5rEbC5J2oaQ1^wFb3I*7|vF!=K?O!+X+g^!j;_t8JS>$Yog#FPj"
    "n-P2w=90UQ(u1mMIe}w=S$n%|)1S0FwxCQ*13*IfCr8ZaRBpC-mdMN?uHy)Ub<<ZW$9{rxT2Y<<^;q=qJ|iW08B}rg9w"
    "!dl69=S_YuZhayE;->d}G?DPEdbLs9~{>q+lm&{3^^@AO*fL_aa8BI`a8U+|nLt4P<6L9NKf*LeID{Txt7n4CZdlnu&!"
    "SIQXbAr!eqg2H!exewmO8d#S2Xp~w=9mG~G!kosg(B-oiC03GCO{72xt4`5xky$VkQ3IJU&8&4^laP8vVNl9NCiC|^%J"
    "w}I{1F*xdhI!A7DhV?}H##7wn5-()ZpBtMvlT%@Vp5y$rC$3FYU?1?y!%N!F=Htqy{X4%Bm<troU+z-Mq@SO9<z7dSYA"
    "+CfqhFlbK^Xfa19EqCeQhxT3jtS`{I+;rHZuzn4T$o573F*^yk%Mp^eFBa}DQ22d$zAw146~QFna`Xgv7jU30;1d_%1;"
    "Nf)U(rczkb&y?{r<foFz1^>cM@=oj1bq#dh?3g$f0jb$GQM`8CyLUr#QvI30lrH2)KC^&~slR5=}~nfUcj2;xNHk^ih="
    "1m@--kQVj%eKk*gQ1$aMVWFA0*%8d~LxGPN16Ce*?a1W60eGwL!(#9*8R_M!IIh9qgGr=X;7lwPseE=0iX`hxlkv9%%E"
    ";sjF=;W*jzzv2qjp`n>4XQ^cnH<k8l3ZZpaS4#C=6zhQCb(X!Zo~EQ?Ca<JpKRa>0IsdVlU-1gFlR_mD<<O{h^8$FZPD"
    "@-RgWb=kGH6!p<oGMSQDh{2{OKhBEA&JY8Z;K<Vw2$?j?qY&9r+185MAI3jucAOHXP}9|C67OwV)|=B{BNNaLpw1eyN;"
    "XqJNMaqI4g&rI=xmM*v)i63R$j|70=L>msU+%X!EFVlpJCRqolrkGVuIinvC+(aV;^}Of7!27M44rCo<D?w-IP6_e@4w"
    "@o(!-(i3WB3v@?Ml$Z6{p<L9RX>}$UtK(FlPb?y@5M$xUY~#S4S6)uzMids0Ae+VM3=#(1M0{v9TslTW=befVs3E8k89"
    "2l^a+D=t5s?JD3Ot#uthL-N&762Lw?cBM*VYE~9fHb5LH!3~`cR_@k3>&%-|dKRkc;B0KJ>d`|+iEZn9yxRx8|I|65V`"
    "4U6KaRqX4L)@zlfNWs*qD>iL(vIy2^hgPEtpM5y8-W6VKyN1k?U4jtL}4#LCy7sF+jE*7vL6M&;L+l80>e-~c(?Ldh`N"
    "Wii%b@RHbBb`;;9ZotUAYT`}h_tG(`neRJ&OepU4_Ij3KySao&Mb4KXcFrX4_qC!paeP=uOrW3O0iiU8!9yX;H%3-FbN"
    "K?r!|w9B%w;D#*>T0q=21!y;Vb6m91W+{N>>52n762$z6pVbf}uxJ<IP@GPL=;8z7!54tjc1f=G4};=tEss1!u<1!m4w"
    "mT)xg86*p*@chQKM?JgsHFj<qN-`M!xI_J;*917?{wG;O*G+n*sfQWSa1-mP${Cg?qrqf+bPBBaE3@fPbtY$^_&Dd0qJ"
    "Vr2S6^sA{-d)lLG<wrgL@us>P23IL!xs+cgg>_}K)ftngL!*GmeJH~?IdMX4@$|VBNxd>!Wj@oTMI00<-oX~Q2y};4b<"
    "l!LB&Io9b91!146x<Q~DFV;L5N0X~f{!I%dJ|NXWq?pus@_l&Cr}=@Czq38eiY*x!EhHRp}TycYmUXfe>1}Afc${-PGt"
    "clgb|y51@ni0&tX37G};5ETDU5xDlNp$4uHx0J|)N_*uo1CEeo_R_G6vEQ5PZ7hN--aCK3|xn_oL}XYdqpRW1I`62Jtm"
    "i4fk>=p#&~rciZ$>f)@D0&e*&!t#p>GCDrB65=|^X!f-l!r+Pq!2N^l>d=HWmu?AKS0HG8cBF5?6^oI}v7Y11xHta*V6"
    "t+72X1y{cxHyM(vIhmF-<aY0eyc3--4Sw1T7VVh%0k~LHUUA_ekj>BQq4je&+m?AWv{k@JR42FgzO+A(6az02`!?Fw^m"
    "m=v{LFy1%WXQvs7VN@287q1{e|*r6>nJ^e*MbcX@`2GvRUdq>rG5@>~wzD>0hN`#Z+6q1^9b9&+e_mqs5Q;Vzt>tz}fp"
    "z6O_I&X{WV|tS3Kbdw~(qbH^@>TtQ@R=)1Zv7!_(q3GA8$3(vp86XA<)^VipsXL=2!+HYig*r_fq62M!<aK9F)-&$iZ+"
    "4-D-;~3PYL#CWo<*(BlH3J0q31=-#e7<fNiI-I6#p@{;_)k&=V9W?ivLI`Qijqu~+RdxQL5U@X)$Z;+;GDVB|%JId)UY"
    "84UsrpaX)4YpDms;4%*2NVpF@7{J`|&>CQIn)c(gLd!WQ0(DRX?oNQ!9OzV2RJ%}X8IR#O)7Pv!3|u7zI`+i_A}!TcMc"
    "|Ihk(&k!<q*AZ=I~zYR}>s;)70DoIIaU6tiiBKh<-zG>TRxiLfCY&ngF}nB&gowl@4DCP6_e^=LFXTw*-#_-wE0TD95("
    "1V~krYFkpfkY58iuGBUx!P@c0+fiM^JVaM$kZ=jKAZGXDD08EuS*Hpj@Sm0!EPTKGs%T!R%;41=#QhWl%rYA-Rn<jdw5"
    "OjbQEx+;A8Z5UT!eY>A+XEI7vV>kVl`8^2@uaGFAxM#+PGAVUuj7_Yh9^LnA@~wpN!C)z1nW(UXaM*t*9RcPeGmXnNb}"
    "W8`sjdqC+1}b27l8z8VL0M`0hPxs%D3qz;SyUVR27Wh5YO5!k_Hbfw09i;WlXMP(qN$l?2ev5!`!-@MgXuz<h)E5I05;"
    "EYC(xoX+Cb+{rF44c6(YjeUsPRS+@gtCQ>F<eK2jC415JbWW5XbUo<twbPCFc11d;XVd)vzJvdw(l~asnA9{Hh;zWv({"
    "%V9iWA@)+8hV0BuI=A<#54p|1lwMv;feq9}i%p>%?h2z{@tpG79K}XH)22<)(cNQ|Loo&Lo{N3GjFD$=h9I+fN%;1DWe"
    ">D<<xscO{%5+9Iy>QN^MPxmWO%AkVm<#vSWJ=BUTHx<{dIxr-12d$tA+A@?dvsS$J(l;DkL=6UQ(9o@~4THFy$fC%}`+"
    "(LH+;v9aZc7_1x1UqDa1CKT9R&6-L=jfW8MG<HV?fmt1(&c0Gesf$lU#{2p7hhe_2!j8Yph&L>`kZr*JfTU@T=fj$r|o"
    "G8NWJDZGfwK(bhQD)7+(!z;J&Jvr_rf*6I3K_Q)6g!1MUKt3r*DONnDcI!3(VM@yXUXe*oj23!P;lj4>ikD^HF9D`Xu6"
    "15dlow9#!l?x4>(qgLAp9M}Nu!3iXf-o)>rPd+Lmw`WgG!|P19fSc|G4P^yE2FMOxK+{%0fglLnC8DtqD;;1GxaE``!z"
    "97i-?M+{AI$&3^TB^l|DJvS(I5Im%%65aGVajrrHWu!(IIX}7P#Oed@QSl<I1z@UuLgE$R4Yz--4T1V+KlvCqf7@5$+>"
    "<V!S{^_XUsH&YUe;^=i_VQUXlV=tLaMXwAe0)Kdaapv@2tFrp0tlfXHc2(T8Jo7r1c7w=}ED+p*Hs2L+#ec~?3nVSnsJ"
    "4Bc?DJq=VCulOi(9yCP)-adZGwrS9W+DJYT(tqL?tvg^KbAlzej>~a>|nzF9)O0k@kSf~MhUHinX3>Q5*FsaD#MO59sU"
    "D0k=$D@;_`}w1B@t+Njt^KKtMY?#WeNJ;I;$wZYnB$=D4R5d9$<8MHw?oF+mZ`6m=Fx!OSzhF>jww(XoXI%J!foYfnI("
    "!b~S@oVeiZS`;J%2U}o=JV6XIsv!ZfZFf)?0Bf2N<tw=M2Y{u+GySu(>lSoB-RyeK7oHAao6}R|Duuw=nlRZ7`L0d%#a"
    "n@9Zp$hvg6pE3fvms9uVoLngjvqs>}DQ9Vc@0LbSf9mGz&*?+_lhA_~C~<KZ5LA0JMlXCHOu-d02v`J_&0}fdt9N6+l9"
    "8FYP{%-x~AvHriDrQ1ve~z}S%&jk$#oCy-`pP%0n5u-4209Ge2;TA<ae8N;H&!vy|-(?RKFaDtXoY~0sdQ6T|dI^G4KY"
    "Gq)@4N3^?x2l8nm(6RlPHl0&KhW^&IQJUV5fIfnX%8l$*G__Y-8Uj=RZ`_9T-f{st^f#3f<cq}JG<8b>6vP3Q)fOU@Yz"
    "qgVd&@YUZJ0VuG#$AFI+p|=L&r1=Db`E2-kmbyJg3XY(K>tF8k6P5L)0T&YDKxC2S!42Le99c_&yK393Ij{e%Amt#}94"
    "zdu4-X7S#(7`5QMlVaRUn*FTkK9}>?9ToCU&vY{)ztnvqyks(7v#2=s3m3D$n->q--`Bp_AMY2E{KO7?5$FPx1iHCI7c"
    "i!9VXq=x%7`(tLw>;dk1qe<^<TcFA1Uzte!xMG9iS;Ato8u+M{~pv-tri7b)LTxxNNzY^E>}JWwbiDm?CgI=bfMiwG*U"
    "J51>8g8QM;zdmnI1-~~JwA<)ho0NfEMFmznr5M&R~qXd)Ahh{P?V;UGzA2R^_yat7VNaA2vcyy6#-AkF@YF+`b)J->)U"
    "6awPAGxs-**0al1ynN66jz)?+PB*xlV-o}hC*iG5i&r@d1`^-QX(Lp1tYwRg>mah)+vGFiBklC$<Xuw_>P-}36c;5?d%"
    "5V@M!|R8XV*y)8fhzMAQNcg0padc?)lzms_C!J2MNKuKC>o$^-D?k?6~vq^<rDC^?p<EvF}UZu6^G=*Jzmp|OMk&PPv3"
    "p<sb<_bOqFfnQB!CRS?4EuVbXHC0oW??k`lB6@OT<kCHt=TIWfF4SRIo*Aq$p7C~sP6oSXI%xs$P&gVK^<<l7;UNLtbH"
    "IHg3zvN8bO}6L^4UG%At4O2y0j%L=(!a^$v!t8M&(hkr4P@xQI1isaycSE&k=Yv#sSO(Fy=<*2;sZ{?9|cv068rm31}i"
    "vx*HzdO)!bLmt3IT%!G+&;}S$VKuVP$Ng$xE;QPR((1q3%-9v&V7Z*;v)y&n74$bXcocY>;nR7wMY6)-~P<v3t<;pq-$"
    "e>z0uM#T|INUbQiDjq<6DJwC36nQT3*>I_CJRk8$15$SJ0YG$@<ma8Q?+|;Yo;#`zj7#fw2+`ha?kbDxWy#lQV2P*NJw"
    "!FFX?%>oCSPlFF;=`4q){AUJF6|45lQlCV*c#s(3cva>E)ydt7u{pC%z;|B4%Q?l~b8)v^NM_OAoKnrEFw_gp2xC=vwM"
    "G9Nx(ohJAn?mF=W3@lD$15inp1rNNk!va>%6RLn;O)F<~h_yGKvraHK1;%p54=}9_1|;kebcPD4R*n<3e-KHny&p0<U^"
    ">8)qAljDrQmfQ0v$&4RXoHdcyl=bfK*}9dQ-&xGz4x?BMgBPp`I5S(Xs(>p_YMpH4?n39T>P;7jAiiiLh2WY3xnQbEl|"
    "ci1mh>13iTs&%FZZ!=SKcira;~t~7&;*T$E{g#$WL(8LT^eejSuf_RLnK?ZQe%+sgS5vPg#(#{solVh&=2K?$D!lny91"
    "oQ?(+Ad7c$qj<sbl>dLEoki8z2V(PI318DI1@&heY9iEcDe{A^~}zgS-nnkxe8-ms8Vje;54#rc~J*9Fvi|NSQX61H5%"
    "WghVNW(Jp>Nm9mg3!zJ>3ksL)IhA3BXl(EPKvt<J>(s1g|A4oKgo@e={1<&9o52cqTacf}YwP1kt)8#e9?NPuMf2i~v?"
    "aC;B3bO6Km#>9L>^v06(`&l2~Yt<jg^{ER(0%~_LV9;(a&!v;0HwWMyBuLFm8UV9SEEBYt4%p11u{hX~4RgRon)^wilm"
    "R|*ZyngzUUoF%0TXE$URr+SjZuM~5GP1Dy$3LDEX!!&GC^ZSfUMSD=u7?;K}|k7r+E}VuC06yKNY>U*8%p7!}Zl>7oT?"
    "b_=(pKO%Y<(*+KM{J1XE78v*M3fcU5xiv9p2iqddOIdMFT!eIn~gEsj}a7vITI1?7#A<M<Em_8tI0~!H#5t4Avdf?@M#"
    "qdN%UGE0f3is=(*uubj6Fl8ms5Nvzc=oXvZrY9mmHZLM0N_<vhI5nbLGR!#PL4V8?k}-*kOS`NR?n=A9r{G?2(%*-AUG"
    "Eg)Ec}hSIvuWbU2ToomB)ViFF57;SQ&JLWVNj!g)&23&OIFgsD=epJ_K!wCphbk=_Pv-sXlLZ8ryK^Ctkcgh6#c30l&-"
    "XoqC}XVrvIOR~#Caf&do43Rr6pt53NIm=QZ%!XBf>~k0BOQbuhXq=R){T&p+!ZpeRf{4eG1u^3SD*eD+10g=qDq4cD)B"
    "X-aY8J?E5-cXB`{qf{1k95$g9ZnIjtPMCST+K8s{yn_hQPhzd}4Ve4a-d-82FVP;3+u5q<t3xxDo(Y#Xi8TgB6Uo1a%|"
    "`Ap!(QT{3u_{7$e$m~1Zyjf+p-rTK$J-x(d9B-yB$dA|tndGTw>EmkLjc1{4|&ANnma~wenxP)=r(e{p0AztUrsjK3_^"
    "L&Tf_YU6);3OoV`dE21w~D|+#u4cE0CW!X0A_Pv67@VrN9PU@S40yq2Xmb75tNj$1fIPYs9AQ{Lqm!lP(+He@exCD0Q0"
    "bL_fiD=BD@Su9|U^qR0;aZ8wyC$o1jiZ;3nM!JI#7$$Jj1!bqyaOKH-s3>kmMW-Uc3{MTxhmihD$WymS(l2IPg)wRfQ~"
    "{o8T9i?UK<A{5*=I}rw}tLy@;vLV7;@bC{tqS5Z4pq^#<3VkcAjB(+C3ZHS&vgZ_bC_ab<_E?CMXD7m_!z=V$COR#Eb@"
    "ZkK@RBxD9I$`}quUOGj@?5_5MK7<_->pv6G(_#3IY%OaXl&+oeLsB;LvH0`(%o6fMS3X$NNfxZhKl7f!FMafM*FJ(0C`"
    "r<T_Lr)iW1j3+@Rc@O&qLcY`szo#A~(9f50B3}c$~BwqUr(0MBY=Xg(<cDG~T9q>z{4Anc&g(HF%^8~tml^c7s#?0qEm"
    "(~GG;C0zNnu@=JKo=eb?q~BDd_3;Mb!Wh0xSufNJ%d`!1B~Uwbx)FvB0#()dWZ4=D#*ZXoLu9Ju;N1ueVxOKz;Xj9#Q;"
    "sC6PG%w#!)EXq$8k}h={;kT3!vOB)9;tuSWM<e4~j_Sl&u@0Q<D1%BW5|K*IqB!-YYDCM-i=&P^SrCWFCh9qb&aBOdIR"
    "ZUv0m-vOY#j-CTOzrS*WBoc3FE0&RAW^Q<6m{}|T2OvG(pD?m_IQZ>cFXOI3Tf$ciJhC;xeN2FCy0z+P>H!Ar&k3A|Ru"
    "wGhZ|a;FX8V1iLP~ML5PLK4Xr!d35ck{=!^H|+L>P{#6M2BVCLvJ&1`doJrkz;D3ztv>Q`Gt-pSULy5{x?O4{)((EDoB"
    "%MDQ`6x=`yBL7iY(<JDROoqP}U?r6f$4B<vVf)BiKC4wVtMawNCVVw#Iwy<*l+x068ZyTlj+H|kyR(`UzE7xaN{$$)ZB"
    "71A)eO#1b=*)|5v0i!hfv4;0OnsN;s{nHE090T^G{!pFxF`YOL{E{xW-I;$k+A+|EHszu0dZ>~q53+*SY0{fbj=Gm6y3"
    "A<e6m+j#l@EwN~dEbuVSbTEU`@c-Z_t$pb&B9pTHA|f_{UzBETkk^T{~F$T<N}y!FLb6n}-D=pZGbW268dSD{|I<kR!>"
    "^_Nj++Gx%J`QlkS?%M>I51K4{#chZqp*0j6FP)d}8D`nEP5ae!`=t$_$=e8Mp>iVad%s`J(5y|hG#zj%`*Gm2De#A0&r"
    "Q(?ma2RSUJVak3tqnGTp@DLSwf_j(W9>Da`Tjtj-I}(d27i$K?TzJ2fphyFcYw1x%R@FU0&A3kwl2ax4WGnXfYyQc7fJ"
    "q<-<vIT<U>>kHhEn{MnCOzk052_2`2yuIs}Giy%{$#6Q`~)kVXh^l}3%B)$T`KxhwOHPiaqO60|DaWn4ghqpt{A9e-*E"
    "a0Q@s<2n+sxX8qdqdIk_8heNyJ#9SL1n!)%Y~l()>hxS0PLo6f-@=JphD0}@0<Px?63nE0W>9-*mqzcU-J)vdWlhnxW8"
    "M#O#lMkSt}TId$thbbAQM)3~xwfT}tpayl(US0F=;IP`e~qG6yhJ31{to+hL8T*xsDy_BD!VhD!IECqO&ym=lJMcij_W"
    "u6df2d+6U#^eF8~Abm)XPe#x@<=gD1Am8o7oZnA;#m(+iFA4BHJP4_LfDSAQ!k|EwGZ9+^uILNA`vo{&Ey}=-hZF_c_>"
    ")2C)jADC;I#D)=({__F!Fc^F|WF>dORgS;qAVin{zN@j1YF<+n)r`9SxzaP(y+bEvPrIRpNZi+wKQ4BfxBb^Xf2+ctX4"
    "ghBe8n9t7M2LwLztOu#_0AXp8eX3dym8CP!|gm={ey-21bpy8j47H_N>+CRJs_dWCfi1Y?5(sQWl#l*FpH`45>sCMw#?"
    ">&EZ-Fp6HTS4`YHrwHr#cfRflpqHzP9vDdk$F=+VbRTGo7w;W61;mOin*<slEmAdwNIj9bFGzS%e`y5qITn9emb2nAUQ"
    "28STxPIg(==20b05zL>_{Nt*J}izwkNz=GFOiIiS2|pMt9xkb$3K`oPv$GX4*Qw2ma;f+#`%->C#uZO;6Gmp~GpijIpA"
    "vkxx~V=b~P@FL0VgZ}lT&G*63(=x#4xA0uy1XS^VmGDO#d|Zi?aZS(~C812O$~~XN3Eefp{+fG*v(M-8__}}Q;r|0DC>"
    "$g"
)
# Passwords every leaked list tops that the list above leaves out (it drops words that other
# zxcvbn dictionaries rank higher: names, sports) or that carry a digit suffix it lacks.
EXTRA_COMMON_PASSWORDS = frozenset(
    """
    password1234 p@ssword qwertyuiop1 administrator1 admin1234 root1234 asdfgh123 batman123
    changeme1 login123 secret123 shadow123 testing123 jennifer michelle christopher
    basketball december
    """.split()
)


@functools.cache
def common_passwords() -> frozenset[str]:
    """The shipped list of common passwords, lower-case."""
    text = zlib.decompress(base64.b85decode(COMMON_PASSWORDS_BLOB)).decode("utf-8")
    return frozenset(text.split("\n")) | EXTRA_COMMON_PASSWORDS


def normalize_email(raw: str | None) -> str | None:
    """A new address, trimmed and lower-cased, if it follows API.md's grammar; else None."""
    if raw is None:
        return None
    email = raw.strip(_ASCII_BLANKS)
    # ASCII first: str.lower() turns some non-ASCII letters (the Kelvin sign) into ASCII.
    if not email.isascii() or len(email) > EMAIL_MAX:
        return None
    email = email.lower()
    if not EMAIL_RE.fullmatch(email) or email.index("@") > EMAIL_LOCAL_MAX:
        return None
    return email


def lookup_email(raw: str) -> str | None:
    """An address to look an existing account up by: trimmed, lower-cased, printable.

    Lenient on purpose: an account registered before the grammar above was enforced can
    still sign in and recover its password; new addresses go through normalize_email.
    """
    email = raw.strip(_ASCII_BLANKS).lower()
    if "@" not in email or len(email) > EMAIL_MAX or not email.isprintable():
        return None
    return email


USER_AGENT_MAX = 256


def printable_text(value: str, limit: int) -> str:
    """Client-written text fit to store and show: its first `limit` characters, without
    control characters (PostgreSQL refuses NUL; a terminal obeys escapes)."""
    return "".join(c for c in value[:limit] if c.isprintable())


def normalize_phone(raw: str | None) -> str | None:
    """The number as an optional '+' and digits (spaces, hyphens dropped), or None."""
    if raw is None:
        return None
    text = raw.strip()
    if not PHONE_RE.fullmatch(text):
        return None
    phone = text.replace(" ", "").replace("-", "")
    digits = phone.lstrip("+")
    return phone if 5 <= len(digits) <= 20 else None


def read_password_blocklist(path: str) -> frozenset[str]:
    """PASSWORD_BLOCKLIST_FILE: one password a line (UTF-8), compared lower-case."""
    with open(path, encoding="utf-8", errors="replace") as lines:
        return frozenset(
            word for line in lines if len(word := line.strip().lower()) >= PASSWORD_MIN
        )


class PasswordPolicy:
    """ASVS 5.0 V6.2: a length, no composition rules (unless PASSWORD_REQUIRE_MIX=1), no
    common password, nothing that names the account or the site."""

    # Shorter local parts and site names would refuse passwords by coincidence ("al").
    MIN_NAME_PART = 4

    def __init__(self, cfg: Config) -> None:
        self._require_mix = cfg.password_require_mix
        self._site_name = cfg.site_name.strip().lower()
        self._blocklist = (
            read_password_blocklist(cfg.password_blocklist_file)
            if cfg.password_blocklist_file
            else frozenset()
        )

    def problem(self, password: str, email: str | None = None) -> str | None:
        """Why a new password is not acceptable (the rule it breaks), or None."""
        if not PASSWORD_MIN <= len(password) <= PASSWORD_MAX:
            return f"Password must be {PASSWORD_MIN} to {PASSWORD_MAX} characters long"
        if self._require_mix:
            kinds = (
                any(c.isalpha() for c in password)
                + any(c.isdigit() for c in password)
                + any(not c.isalnum() for c in password)
            )
            if kinds < 2:
                return "Password must mix at least two of: letters, digits, other characters"
        folded = password.lower()
        if folded in common_passwords() or folded in self._blocklist:
            return "Password is on the list of common passwords; choose another"
        if email:
            local = email.partition("@")[0]
            if folded == email or (len(local) >= self.MIN_NAME_PART and local in folded):
                return "Password must not contain your email address"
        if len(self._site_name) >= self.MIN_NAME_PART and self._site_name in folded:
            return "Password must not contain the site name"
        return None


class PasswordHasher:
    """Argon2id off the event loop: gevent's thread pool, at most N hashes at once."""

    def __init__(self, cfg: Config) -> None:
        self._hasher = argon2.PasswordHasher(
            time_cost=cfg.argon2_time_cost,
            memory_cost=cfg.argon2_memory_kib,
            parallelism=cfg.argon2_parallelism,
            type=argon2.Type.ID,
        )
        self._slots = threading.BoundedSemaphore(cfg.argon2_max_concurrency)
        self._max_queue = cfg.argon2_max_queue
        self._queued = 0
        self._queue_lock = threading.Lock()
        self._offload = gevent.monkey.is_module_patched("threading")
        self._dummy_hash: str | None = None

    def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        # Argon2 releases the GIL, so a worker thread hashes while the loop serves others;
        # the semaphore caps memory at argon2_memory_kib x argon2_max_concurrency.
        if not self._slots.acquire(blocking=False):
            self._wait_for_slot()
        try:
            if self._offload:
                return gevent.get_hub().threadpool.apply(fn, args)
            return fn(*args)
        finally:
            self._slots.release()

    def _wait_for_slot(self) -> None:
        # A flood of logins (60 addresses at once) would queue here and push every real
        # login past a second; beyond ARGON2_MAX_QUEUE waiting, refuse at once instead.
        with self._queue_lock:
            if self._queued >= self._max_queue:
                raise ApiError(
                    503,
                    "busy",
                    "Too many sign-ins at once, try again in a moment",
                    {"Retry-After": "1"},
                )
            self._queued += 1
        try:
            self._slots.acquire()
        finally:
            with self._queue_lock:
                self._queued -= 1

    def hash(self, password: str) -> str:
        """A new Argon2id hash of a password."""
        return self._run(self._hasher.hash, password)

    def verify(self, password_hash: str, password: str) -> bool:
        """True if the password matches the hash."""
        outcome = self._run(self._check, password_hash, password)
        if outcome is None:
            log.warning("stored password hash could not be checked (corrupt or foreign format)")
        return bool(outcome)

    def _check(self, password_hash: str, password: str) -> bool | None:
        # Runs in a worker thread: answer instead of raising, since gevent's pool prints
        # a traceback for every exception that crosses it.
        try:
            return self._hasher.verify(password_hash, password)
        except argon2.exceptions.VerifyMismatchError:
            return False
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
            return None

    def spend_one_verification(self, password: str) -> None:
        """Do the work of one failed verification, so unknown accounts cost the same time."""
        if self._dummy_hash is None:
            self._dummy_hash = self.hash(secrets.token_hex(16))
        self.verify(self._dummy_hash, password)

    def needs_rehash(self, password_hash: str) -> bool:
        """True if the hash was made with other parameters than the current ones."""
        try:
            return self._hasher.check_needs_rehash(password_hash)
        except argon2.exceptions.InvalidHashError:
            return True


def new_token() -> str:
    """A URL-safe random token of 256 bits."""
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    """The SHA-256 of a token, hex: what storage keeps instead of the token."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


# Two-factor codes: TOTP (RFC 6238) over HOTP (RFC 4226), HMAC-SHA1, 6 digits, 30 s steps,
# the ones authenticator apps use by default; a code of the step before or after counts
# too (clocks drift, people type slowly).
TOTP_STEP_SECONDS = 30
TOTP_DIGITS = 6
TOTP_SECRET_BYTES = 20  # 160 bits, RFC 4226's recommendation
RECOVERY_CODES = 10
_RECOVERY_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"  # no 0/o, 1/l/i to misread


def hotp(key: bytes, counter: int, digits: int = TOTP_DIGITS) -> str:
    """RFC 4226: the one-time code of a key and a counter."""
    mac = hmac.new(key, counter.to_bytes(8, "big"), hashlib.sha1).digest()
    offset = mac[-1] & 0x0F
    value = int.from_bytes(mac[offset : offset + 4], "big") & 0x7FFFFFFF
    return str(value % 10**digits).zfill(digits)


def totp_step(unix_time: float) -> int:
    """RFC 6238: the time step a moment falls in."""
    return int(unix_time // TOTP_STEP_SECONDS)


def new_totp_secret() -> str:
    """A fresh secret as authenticator apps take it: base32, no padding."""
    return base64.b32encode(secrets.token_bytes(TOTP_SECRET_BYTES)).decode().rstrip("=")


def totp_key(secret: str) -> bytes:
    """The key of a base32 secret (any case, padding optional)."""
    text = secret.strip().upper()
    return base64.b32decode(text + "=" * (-len(text) % 8))


def matching_totp_step(secret: str, code: str, unix_time: float, after: int | None) -> int | None:
    """The time step, the current one or one either side, whose code `code` is, if it is
    later than `after` (the last step accepted: no code works twice); None otherwise."""
    code = "".join(code.split())
    if len(code) != TOTP_DIGITS or not (code.isascii() and code.isdigit()):
        return None
    key, now = totp_key(secret), totp_step(unix_time)
    for step in (now - 1, now, now + 1):
        if (after is None or step > after) and hmac.compare_digest(hotp(key, step), code):
            return step
    return None


def otpauth_uri(site_name: str, email: str, secret: str) -> str:
    """The Key URI authenticator apps scan (as a QR code) or take pasted."""
    issuer = urllib.parse.quote(site_name, safe="")
    label = f"{issuer}:{urllib.parse.quote(email, safe='@')}"
    query = urllib.parse.urlencode(
        {
            "secret": secret,
            "issuer": site_name,
            "algorithm": "SHA1",
            "digits": TOTP_DIGITS,
            "period": TOTP_STEP_SECONDS,
        },
        quote_via=urllib.parse.quote,
    )
    return f"otpauth://totp/{label}?{query}"


def new_recovery_code() -> str:
    """A single-use recovery code: 16 characters of 31 (79 bits), in groups of four."""
    raw = "".join(secrets.choice(_RECOVERY_ALPHABET) for _ in range(16))
    return "-".join(raw[i : i + 4] for i in range(0, 16, 4))


def recovery_code_hash(code: str) -> str | None:
    """What storage keeps of a recovery code, however it was typed (case, blanks,
    dashes); None for anything that cannot be one."""
    raw = "".join(c for c in code.lower() if c not in " -\t")
    if len(raw) != 16 or any(c not in _RECOVERY_ALPHABET for c in raw):
        return None
    return token_hash(f"recovery:{raw}")


def sign(secret: bytes, purpose: str, payload: str) -> str:
    """A 128-bit HMAC-SHA256 of payload for one purpose, URL-safe base64."""
    mac = hmac.new(secret, f"{purpose}\0{payload}".encode(), hashlib.sha256).digest()[:16]
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode("ascii")


def signature_matches(secret: bytes, purpose: str, payload: str, signature: str) -> bool:
    """True if signature is sign(secret, purpose, payload); constant time."""
    return hmac.compare_digest(sign(secret, purpose, payload), signature)


_VISITOR_ID_RE = re.compile(r"([A-Za-z0-9_-]{22})\.([0-9]{1,12})\.([A-Za-z0-9_-]{22})")


def new_visitor_id(secret: bytes) -> str:
    """A chat visitor id only this server can have issued: random, issue time, signature."""
    payload = f"{secrets.token_urlsafe(16)}.{int(time.time())}"
    return f"{payload}.{sign(secret, 'visitor', payload)}"


def visitor_id_is_valid(secret: bytes, value: str, max_age: int) -> bool:
    """True for an id new_visitor_id issued within max_age seconds; made-up ones fail."""
    match = _VISITOR_ID_RE.fullmatch(value)
    if match is None or time.time() - int(match.group(2)) > max_age:
        return False
    return signature_matches(secret, "visitor", value.rpartition(".")[0], match.group(3))


_DEVICE_COOKIE_RE = re.compile(r"([A-Za-z0-9_-]{22})\.([A-Za-z0-9_-]{22})")


def new_device_cookie(secret: bytes, user_id: int) -> str:
    """OWASP's device cookie: a browser's proof that it signed in to this account before."""
    nonce = secrets.token_urlsafe(16)
    return f"{nonce}.{sign(secret, f'device:{user_id}', nonce)}"


def device_nonce(secret: bytes, value: str | None, user_id: int) -> str | None:
    """The nonce of a device cookie issued for this account, or None."""
    match = _DEVICE_COOKIE_RE.fullmatch(value or "")
    if match and signature_matches(secret, f"device:{user_id}", match.group(1), match.group(2)):
        return match.group(1)
    return None


class LimitCheck(NamedTuple):
    """One rate-limited attempt: the rule, the action counted, and whose attempt it is (an
    address, an account, a visitor id, a device): the key is a hash of action and whose."""

    rule: RateLimit
    action: str
    whose: str


def rate_limit_windows(checks: Sequence[LimitCheck]) -> list[tuple[str, int, int]]:
    """The key-value store's (key, window, limit) for each check."""
    windows = []
    for rule, action, whose in checks:
        # Hashed, so that emails and addresses never sit in the key space in clear.
        digest = hashlib.sha256(whose.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        windows.append((f"rl:{action}:{digest}", rule.window, rule.limit))
    return windows


def rate_limit_keys(actions: Sequence[str], whose: str) -> list[str]:
    """The key-value keys that count `whose` attempts at these actions (to clear them)."""
    return [
        key
        for key, _, _ in rate_limit_windows(
            [LimitCheck(RateLimit(1, 1), a, whose) for a in actions]
        )
    ]


def seconds_until_allowed(
    checks: Sequence[LimitCheck], counts: Sequence[tuple[int, int]]
) -> int | None:
    """Seconds until every exceeded limit reopens; None when no limit is exceeded."""
    waits = []
    for (rule, action, _), (count, left) in zip(checks, counts, strict=True):
        if count > rule.limit:
            waits.append(left)
            metrics.count("cloudchat_rate_limited_total", action=action)
    return max(waits) if waits else None


def over_rate_limits(kv: KeyValueStore, checks: Sequence[LimitCheck]) -> int | None:
    """Count an attempt against every check, in one round trip; seconds to wait, or None."""
    counts, _ = kv.hit_many(rate_limit_windows(checks))
    return seconds_until_allowed(checks, counts)


def client_ip(environ: Mapping[str, Any], trusted: tuple[Any, ...]) -> str:
    """The client's address: the socket peer, or what a trusted proxy in front reports."""
    peer = environ.get("REMOTE_ADDR") or "unknown"
    if not is_trusted_peer(peer, trusted):
        return peer
    forwarded = environ.get("HTTP_X_FORWARDED_FOR", "")
    # Walk from the right: each entry was appended by the hop before; the first one not
    # added by our own proxies is the client. Entries further left are the client's words.
    for entry in reversed([item.strip() for item in forwarded.split(",") if item.strip()]):
        try:
            address = str(ipaddress.ip_address(entry))
        except ValueError:
            return peer
        if not is_trusted_peer(address, trusted):
            return address
    return peer


def address_key(ip: str, ipv6_prefix: int) -> str:
    """What a client address counts as for rate limits: an IPv4 address itself, an IPv6
    one by its network of IPV6_PREFIX_LENGTH bits (a subscriber holds a whole /64)."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if address.version == 4:
        return ip
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(ipaddress.ip_network((address, ipv6_prefix), strict=False))


def is_trusted_peer(address: str, trusted: tuple[Any, ...]) -> bool:
    """Whether an address is in one of the trusted networks."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


###############################################################################
# Sessions
###############################################################################


def _session_cache_key(id_hash: str) -> str:
    return f"sess:{id_hash}"


# What a cached session holds: the user's public fields, so that a request with a cached
# session costs one Redis GET and no SQL. Only active users are cached.
_CACHED_USER_FIELDS = (
    "id",
    "uid",
    "email",
    "phone",
    "display_name",
    "email_verified",
    "mfa_enabled",
)
_CACHED_USER_KEYS = frozenset(_CACHED_USER_FIELDS)
# What a revoked session's cache key holds instead, for a while: a request that read the
# session from SQL just before the revocation and fills the cache just after finds the key
# taken (the fill is SET NX), so revocation wins every race. The mark outlives the longest
# gap between such a read and its fill by far.
_REVOKED = "revoked"
REVOCATION_MARK_SECONDS = 60


def _cache_session(
    cfg: Config,
    kv: KeyValueStore,
    id_hash: str,
    user: User,
    expires_at: dt.datetime,
    unreadable: str | None = None,
) -> None:
    """Cache a live session of an active user for at most SESSION_CACHE_SECONDS, unless the
    key is taken (by a revocation mark, or an entry another request filled); an entry this
    request found unreadable (an older release's format) is replaced only if still there.

    Only a shared store (Redis) caches: an in-process cache could not hear of a revocation
    made by another process, and SQLite in the same process answers about as fast. The
    bound is how long a change made straight in SQL (not through CloudChat, which marks
    the key) can take to reach a live session.
    """
    ttl = _cache_seconds(cfg, expires_at)
    if not kv.shared or ttl <= 0:
        return
    value = _cached_value(user)
    key = _session_cache_key(id_hash)
    try:
        if unreadable is None:
            kv.set(key, value, ttl, only_if_absent=True)
        else:
            kv.replace(key, unreadable, value, ttl)
    except StoreUnavailable as exc:
        outage_log.warning("session cache not filled", exc)


def _cache_seconds(cfg: Config, expires_at: dt.datetime) -> int:
    """How long a session may stay cached: SESSION_CACHE_SECONDS, never past its expiry."""
    return min(cfg.session_cache_seconds, int((expires_at - utcnow()).total_seconds()))


def _cached_value(user: User) -> str:
    return json.dumps(
        {name: getattr(user, name) for name in _CACHED_USER_FIELDS}, separators=(",", ":")
    )


def refresh_cached_sessions(sql: SqlStore, kv: KeyValueStore, cfg: Config, user_id: int) -> None:
    """After a change of an account's profile or address, its cached sessions hold the new
    values at once. A plain SET, not SET NX: a request that read the old row and fills the
    cache afterwards finds the key taken; a revocation mark is never overwritten."""
    if not kv.shared:
        return
    user = get_user_by_id(sql, user_id)
    if user is None or not user.is_active:
        return
    value = _cached_value(user)
    idle = dt.timedelta(seconds=cfg.session_idle_seconds)
    items = [
        (_session_cache_key(id_hash), value, _cache_seconds(cfg, as_datetime(expires)))
        for id_hash, *_, expires in list_user_sessions(sql, user_id, idle)
    ]
    try:
        kv.overwrite_unless([item for item in items if item[2] > 0], _REVOKED)
    except StoreUnavailable as exc:
        log.error("cached sessions not refreshed (they hold the old profile a while): %s", exc)


def _user_from_cache(value: str) -> User | None:
    """The user a cached session holds; None for anything else (an older format, say)."""
    try:
        cached = json.loads(value)
    except ValueError:
        return None
    if not isinstance(cached, dict) or cached.keys() != _CACHED_USER_KEYS:
        return None
    try:
        return User(**cached, is_active=True)  # only active users are cached
    except TypeError:
        return None


def create_session(
    sql: SqlStore, kv: KeyValueStore, cfg: Config, user: User, user_agent: str, ip: str
) -> str:
    """Start a session for an active user: durable row, warm cache; return the cookie's id.
    Beyond SESSION_MAX_PER_USER, the user's least recently used sessions end."""
    token = new_token()
    id_hash = token_hash(token)
    expires_at = utcnow() + dt.timedelta(seconds=cfg.session_ttl)
    ended = insert_session(
        sql,
        id_hash,
        user.id,
        # Client-written: no control characters (PostgreSQL refuses NUL), bounded length.
        printable_text(user_agent, USER_AGENT_MAX),
        ip,
        expires_at,
        cfg.session_max_per_user,
    )
    mark_cached_sessions_revoked(kv, cfg, ended)
    _cache_session(cfg, kv, id_hash, user, expires_at)
    return token


def get_session_user(sql: SqlStore, kv: KeyValueStore, cfg: Config, token: str) -> User | None:
    """The active user of a live session: from the cache, else from SQL; None otherwise."""
    id_hash = token_hash(token)
    cached = None
    if kv.shared:
        try:
            cached = kv.get(_session_cache_key(id_hash))
        except StoreUnavailable as exc:
            outage_log.warning("session cache unavailable, reading SQL", exc)
            cached = None
        if cached == _REVOKED:
            return None
        user = _user_from_cache(cached) if cached is not None else None
        if user is not None:
            return user
    found = get_live_session_user(sql, id_hash, dt.timedelta(seconds=cfg.session_idle_seconds))
    if found is None or not found[0].is_active:
        return None
    user, expires_at = found
    _cache_session(cfg, kv, id_hash, user, expires_at, unreadable=cached)
    return user


def revoke_session(sql: SqlStore, kv: KeyValueStore, cfg: Config, token: str) -> bool:
    """End the session of a cookie at once; True if it was live."""
    return revoke_session_by_hash(sql, kv, cfg, token_hash(token))


def revoke_session_by_hash(sql: SqlStore, kv: KeyValueStore, cfg: Config, id_hash: str) -> bool:
    """End one session at once: SQL first (the authority), then the cache; True if it was
    not ended already."""
    # Nothing to mark for a made-up id or an ended session: no request can be filling the
    # cache from a live row, and a planted cookie must not make keys.
    if not mark_session_revoked(sql, id_hash):
        return False
    mark_cached_sessions_revoked(kv, cfg, [id_hash])
    return True


def session_public_id(id_hash: str) -> str:
    """A session's id as the API shows it: not the cookie, and no way back to it."""
    return hashlib.sha256(f"public:{id_hash}".encode()).hexdigest()[:32]


def revoke_user_sessions(
    sql: SqlStore, kv: KeyValueStore, cfg: Config, user_id: int, keep_token: str | None = None
) -> int:
    """End every session of a user (but `keep_token`'s) and every password-reset and
    change-of-address link still out for the account; return how many sessions ended.

    Every caller (password change and reset, change of address, deactivation) ends what a
    thief may hold: a link mailed before the change must not undo it. The per-user index is
    sessions(user_id) in SQL: it survives a Redis flush, and the hashes it returns name
    exactly the cache keys to mark, so nothing scans the key space.
    """
    hashes = mark_user_sessions_revoked(
        sql, user_id, token_hash(keep_token) if keep_token else None
    )
    delete_reset_tokens(sql, user_id)
    mark_cached_sessions_revoked(kv, cfg, hashes)
    return len(hashes)


def mark_cached_sessions_revoked(kv: KeyValueStore, cfg: Config, hashes: list[str]) -> None:
    if not kv.shared:
        return
    try:
        kv.set_many(
            [(_session_cache_key(h), _REVOKED) for h in hashes],
            cfg.session_cache_seconds + REVOCATION_MARK_SECONDS,
        )
    except StoreUnavailable as exc:
        # SQL already says revoked; a cache that comes back empty holds nothing stale.
        log.error("revoked sessions not marked in the cache: %s", exc)


###############################################################################
# Mail
###############################################################################


@dataclasses.dataclass(frozen=True)
class Mail:
    """One account mail; `secret` is text in it (a token) that must never be logged."""

    kind: str
    to: str
    subject: str
    text: str
    secret: str = ""


def welcome_mail(cfg: Config, to: str) -> Mail:
    """The mail after registration."""
    return Mail(
        "welcome",
        to,
        f"Welcome to {cfg.site_name}",
        f"Hello,\n\nyour {cfg.site_name} account for {to} is ready. You can sign in at"
        f" {cfg.frontend_base_url}/ with this address and your password.\n\n"
        f"If you did not create this account, ignore this mail.\n\n- {cfg.site_name}\n",
    )


def reset_mail(cfg: Config, to: str, token: str) -> Mail:
    """The mail with a password reset link."""
    minutes = max(1, cfg.pwreset_token_ttl // 60)
    link = f"{cfg.frontend_base_url}/reset_password?token={token}"
    return Mail(
        "reset",
        to,
        f"Reset your {cfg.site_name} password",
        f"Hello,\n\nsomeone asked to reset the password of your {cfg.site_name} account."
        f" To choose a new password, open this link within {minutes} minutes:\n\n{link}\n\n"
        f"The link works once. If you did not ask for it, ignore this mail: your password"
        f" stays as it is.\n\n- {cfg.site_name}\n",
        secret=token,
    )


def password_changed_mail(cfg: Config, to: str) -> Mail:
    """The confirmation after a password change or reset."""
    return Mail(
        "password_changed",
        to,
        f"Your {cfg.site_name} password was changed",
        f"Hello,\n\nthe password of your {cfg.site_name} account {to} was just changed.\n\n"
        f"If that was not you, reset it at once from {cfg.frontend_base_url}/ and reply to"
        f" this mail.\n\n- {cfg.site_name}\n",
    )


def verify_mail(cfg: Config, to: str, token: str, welcome: bool) -> Mail:
    """The link that confirms an account's address; at registration, with the welcome."""
    link = f"{cfg.frontend_base_url}/verify_email?token={token}"
    hours = max(1, cfg.email_token_ttl // 3600)
    opening = (
        f"your {cfg.site_name} account for {to} is ready."
        if welcome
        else f"someone asked to confirm this address for your {cfg.site_name} account."
    )
    return Mail(
        "verify",
        to,
        f"Confirm your email address for {cfg.site_name}",
        f"Hello,\n\n{opening} To confirm that this address is yours, open this link within"
        f" {hours} hours:\n\n{link}\n\nThe link works once. If you did not ask for it, ignore"
        f" this mail.\n\n- {cfg.site_name}\n",
        secret=token,
    )


def email_change_mail(cfg: Config, to: str, token: str) -> Mail:
    """The link, to the new address, that makes it the account's."""
    link = f"{cfg.frontend_base_url}/verify_email?token={token}"
    hours = max(1, cfg.email_token_ttl // 3600)
    return Mail(
        "email_change",
        to,
        f"Confirm your new email address for {cfg.site_name}",
        f"Hello,\n\nsomeone asked to move a {cfg.site_name} account to this address. To"
        f" confirm it, open this link within {hours} hours:\n\n{link}\n\nUntil then the"
        f" account keeps its old address. If you did not ask for it, ignore this mail.\n\n"
        f"- {cfg.site_name}\n",
        secret=token,
    )


def email_change_notice_mail(cfg: Config, to: str, new_address: str) -> Mail:
    """The notice, to the old address, that a move to another one was asked for."""
    return Mail(
        "email_change_notice",
        to,
        f"Your {cfg.site_name} email address is about to change",
        f"Hello,\n\nsomeone signed in to your {cfg.site_name} account {to} asked to move it"
        f" to {mask_email(new_address)}. It moves when the link mailed there is used.\n\n"
        f"If that was not you, change your password at once from {cfg.frontend_base_url}/"
        f" (that also ends the move) and reply to this mail.\n\n- {cfg.site_name}\n",
    )


def mfa_changed_mail(cfg: Config, to: str, enabled: bool) -> Mail:
    """The notice that two-factor sign-in was switched on or off."""
    state = "on" if enabled else "off"
    return Mail(
        f"mfa_{'enabled' if enabled else 'disabled'}",
        to,
        f"Two-factor sign-in is {state} for your {cfg.site_name} account",
        f"Hello,\n\ntwo-factor sign-in was just switched {state} for your {cfg.site_name}"
        f" account {to}.\n\nIf that was not you, change your password at once from"
        f" {cfg.frontend_base_url}/ and reply to this mail.\n\n- {cfg.site_name}\n",
    )


def account_deleted_mail(cfg: Config, to: str) -> Mail:
    """The confirmation that an account and its data are gone."""
    return Mail(
        "account_deleted",
        to,
        f"Your {cfg.site_name} account was deleted",
        f"Hello,\n\nyour {cfg.site_name} account {to} and everything stored with it were"
        f" deleted just now.\n\nIf that was not you, reply to this mail.\n\n"
        f"- {cfg.site_name}\n",
    )


def build_message(cfg: Config, mail: Mail) -> email.message.EmailMessage:
    """A UTF-8 message with Date and Message-ID, plain text plus an HTML alternative."""
    message = email.message.EmailMessage()
    message["From"] = email.utils.formataddr((cfg.mail_sender_name, cfg.mail_from))
    message["To"] = mail.to
    message["Subject"] = mail.subject
    message["Date"] = email.utils.formatdate(usegmt=True)
    message["Message-ID"] = email.utils.make_msgid(domain=cfg.mail_from.rpartition("@")[2])
    message.set_content(mail.text)
    paragraphs = "".join(
        f"<p>{_linkify(html_escape(block)).replace(chr(10), '<br>')}</p>"
        for block in mail.text.strip().split("\n\n")
    )
    message.add_alternative(
        f'<!doctype html><html><body style="font-family:sans-serif">{paragraphs}</body></html>',
        subtype="html",
    )
    return message


def _linkify(escaped: str) -> str:
    return re.sub(r"(https?://[^\s<]+)", r'<a href="\1">\1</a>', escaped)


def mask_email(address: str) -> str:
    """An address as logs may show it: first character and domain."""
    local, _, domain = address.partition("@")
    return f"{local[:1]}***@{domain}"


class MailDeliveryError(Exception):
    """A mail could not be delivered; `temporary` says whether trying again may help."""

    def __init__(self, reason: str, temporary: bool) -> None:
        super().__init__(reason)
        self.temporary = temporary


class BackgroundJobs:
    """Work done after the answer has gone (mail, a reset lookup whose timing must not
    show): errors are logged, and wait() lets what is queued finish at shutdown."""

    def __init__(self) -> None:
        self._jobs: set[gevent.Greenlet] = set()

    def spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run fn(*args) in the background."""
        job = gevent.spawn(self._guarded, fn, *args)
        self._jobs.add(job)
        job.link(self._jobs.discard)

    @staticmethod
    def _guarded(fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except StoreUnavailable as exc:
            log.warning("background job %s: %s", fn.__name__, exc)
        except Exception:
            log.exception("background job %s failed", fn.__name__)

    def wait(self, timeout: float) -> None:
        """Give queued jobs up to `timeout` seconds to finish (at shutdown)."""
        if self._jobs:
            gevent.joinall(list(self._jobs), timeout=timeout)


class Mailer:
    """Sends account mail off the request path, with a small bounded retry.

    Without SMTP_HOST it writes each message to the log instead (development), with any
    token in it redacted: DEBUG_RETURN_RESET_TOKEN=1 hands the token to the developer.
    """

    RETRY_DELAYS = (1.0, 3.0, 10.0)

    def __init__(self, cfg: Config, jobs: BackgroundJobs) -> None:
        self._cfg = cfg
        self._slots = threading.BoundedSemaphore(4)
        self._jobs = jobs

    def send(self, mail: Mail) -> None:
        """Queue a mail; the request goes on at once."""
        self._jobs.spawn(self.deliver, mail)

    def deliver(self, mail: Mail) -> bool:
        """Deliver one mail now, retrying temporary failures; True once it was accepted."""
        to = mask_email(mail.to)
        if not self._cfg.smtp_host:
            text = mail.text.replace(mail.secret, "[redacted]") if mail.secret else mail.text
            text = text.replace(mail.to, to)
            log.info(
                "mail %s to %s not sent, SMTP_HOST is unset; subject %r; text %r",
                mail.kind,
                to,
                mail.subject,
                text,
            )
            return False
        message = build_message(self._cfg, mail)
        attempts = self._cfg.mail_retries + 1
        with self._slots:
            for attempt in range(1, attempts + 1):
                try:
                    self._smtp_send(message, mail.to)
                except MailDeliveryError as exc:
                    if exc.temporary and attempt < attempts:
                        gevent.sleep(self.RETRY_DELAYS[min(attempt, len(self.RETRY_DELAYS)) - 1])
                        continue
                    log.error(
                        "mail %s to %s failed after %d attempt(s): %s",
                        mail.kind,
                        to,
                        attempt,
                        _escape(str(exc)),
                    )
                    metrics.count("cloudchat_mails_total", kind=mail.kind, outcome="failed")
                    return False
                log.info("mail %s to %s sent (attempt %d)", mail.kind, to, attempt)
                metrics.count("cloudchat_mails_total", kind=mail.kind, outcome="sent")
                return True
        return False

    def _smtp_send(self, message: email.message.EmailMessage, to: str) -> None:
        cfg = self._cfg
        context = ssl.create_default_context(cafile=cfg.smtp_ca_file or None)
        try:
            smtp: smtplib.SMTP
            if cfg.smtp_port == 465:
                smtp = smtplib.SMTP_SSL(
                    cfg.smtp_host, cfg.smtp_port, timeout=cfg.smtp_timeout, context=context
                )
            else:
                smtp = smtplib.SMTP(cfg.smtp_host, cfg.smtp_port, timeout=cfg.smtp_timeout)
            with smtp:
                if cfg.smtp_tls and cfg.smtp_port != 465:
                    smtp.starttls(context=context)
                if cfg.smtp_user:
                    smtp.login(cfg.smtp_user, cfg.smtp_pass)
                # The envelope names the one stored address; never let smtplib read the
                # recipients out of the headers, where a comma would make two.
                smtp.send_message(message, from_addr=cfg.mail_from, to_addrs=[to])
        except smtplib.SMTPResponseException as exc:
            detail = exc.smtp_error.decode("utf-8", "replace") if exc.smtp_error else ""
            raise MailDeliveryError(
                f"server answered {exc.smtp_code} {detail}", 400 <= exc.smtp_code < 500
            ) from exc
        except smtplib.SMTPRecipientsRefused as exc:
            codes = [code for code, _ in exc.recipients.values()]
            raise MailDeliveryError(
                f"recipient refused ({codes})", all(400 <= c < 500 for c in codes)
            ) from exc
        except ssl.SSLError as exc:
            raise MailDeliveryError(f"TLS failed: {exc}", False) from exc
        except smtplib.SMTPNotSupportedError as exc:
            raise MailDeliveryError(f"server lacks a feature: {exc}", False) from exc
        except (smtplib.SMTPException, OSError) as exc:
            raise MailDeliveryError(f"{type(exc).__name__}: {exc}", True) from exc


###############################################################################
# Chat
###############################################################################

# A stream longer than this without a line break is not SSE, and an event longer than this
# is not a token: give up instead of buffering.
_SSE_MAX_LINE = 1024 * 1024
_SSE_MAX_EVENT = 1024 * 1024
# Idle connections kept per host however quiet it has been; more are kept after a burst.
_UPSTREAM_IDLE_MIN = 4
# How long a provider's resolved addresses are used before asking the resolver again.
_UPSTREAM_DNS_SECONDS = 60.0


class ProviderError(Exception):
    """A model provider failed; `kind` is auth, rate, server or network."""

    def __init__(
        self, provider: str, kind: str, detail: str, retry_after: str | None = None
    ) -> None:
        super().__init__(f"{provider}: {detail}")
        self.kind = kind
        self.retry_after = retry_after


def chat_request_body(cfg: Config, provider: ProviderConfig, messages: list[dict]) -> bytes:
    """The JSON body of a streamed chat-completions request."""
    body: dict[str, Any] = {
        "model": provider.model,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": cfg.chat_max_tokens,
    }
    if not cfg.chat_thinking:
        # Thinking models ignore or reject temperature; send it only without thinking.
        body["temperature"] = cfg.chat_temperature
    if provider.name == "deepseek":
        body["thinking"] = {"type": "enabled" if cfg.chat_thinking else "disabled"}
    elif provider.name == "dashscope" and cfg.chat_thinking:
        body["enable_thinking"] = True
    return _json_bytes(body)


# Chat set-up steps (a request's checks and history, a TLS handshake's crypto) start in a
# turn of the event loop only while it has lasted less than this: see TurnGate.
CHAT_SETUP_SECONDS_PER_TURN = 0.005


class TurnGate:
    """Callers pass while the event loop's current turn has lasted less than `budget`
    seconds since the first of them passed (one always passes); the others wait for later
    turns, first come first served.

    gevent runs every greenlet whose socket became ready before it looks at the sockets
    again. When 500 chats arrive together, 500 set-ups (about a millisecond of CPU each,
    more with a TLS handshake) would run back to back, and a health probe or a login that
    came in meanwhile would wait for all of them. Through the gate it waits a few
    milliseconds of them per turn; the burst's total CPU, and so its end, is the same.

    A set-up already under way (`going_on`: its TLS handshake's next step) goes before the
    new ones: each chat then reaches its first token as soon as it can, instead of every
    chat's handshake waiting behind every other chat's start.
    """

    def __init__(self, budget: float) -> None:
        self._budget = budget
        self._used = 0  # passed in the current turn
        self._began = 0.0  # when the first of them passed
        self._going_on: deque[gevent.event.Event] = deque()  # served first
        self._new: deque[gevent.event.Event] = deque()
        self._turn_end: Any = None  # a timer that fires in the loop's next turn

    def wait_turn(self, going_on: bool = False) -> None:
        """Return at once if this turn has room, else when a later one has."""
        if self._turn_end is None:
            self._used = 0
            self._began = time.perf_counter()
            self._start_timer()
        room = self._used == 0 or time.perf_counter() - self._began < self._budget
        if room and not self.queued:
            self._used += 1
            return
        ready = gevent.event.Event()
        (self._going_on if going_on else self._new).append(ready)
        ready.wait()
        # The next in line follows once this caller's step is done (callbacks run in
        # order), if the turn still has room then.
        gevent.get_hub().loop.run_callback(self._release_next)

    def _release_next(self) -> None:
        if self.queued and time.perf_counter() - self._began < self._budget:
            self._used += 1
            (self._going_on or self._new).popleft().set()

    @property
    def queued(self) -> bool:
        """Callers are waiting for a turn: a burst is being set up."""
        return bool(self._going_on or self._new)

    def _start_timer(self) -> None:
        # A timer due at once fires after the loop has polled its sockets: a new turn.
        self._turn_end = gevent.get_hub().loop.timer(0.0)
        self._turn_end.start(self._next_turn)

    def _next_turn(self) -> None:
        self._turn_end.close()
        self._turn_end = None
        self._used = 0
        self._began = time.perf_counter()
        if self.queued:  # the first in line goes on; more if the turn has room then
            self._used = 1
            (self._going_on or self._new).popleft().set()
            self._start_timer()


class UpstreamPool:
    """Keep-alive connections to the providers, and their TLS sessions.

    A burst of 500 visitors opens 500 provider connections at once. After it, as many idle
    connections are kept per host as were in use at once within the last `idle_seconds`
    (at least _UPSTREAM_IDLE_MIN, at most `max_idle`), each closed once idle that long: the
    next burst reuses them instead of paying a TCP and TLS handshake per visitor, and a
    quiet server lets them go. A new TLS connection offers the host's newest session
    ticket: a resumed handshake skips the certificate chain on both sides.
    """

    def __init__(
        self,
        connect_timeout: float,
        read_timeout: float,
        idle_seconds: float,
        max_idle: int,
        gate: TurnGate | None = None,
    ) -> None:
        self._gate = gate
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._idle_seconds = idle_seconds
        self._max_idle = max_idle
        # Per host: idle (returned at, connection) pairs, oldest first; taken newest first.
        self._idle: dict[tuple[str, str, int], list[tuple[float, http.client.HTTPConnection]]] = {}
        self._in_use: dict[tuple[str, str, int], int] = {}
        # Per host: the most connections in use at once, and since when that is the figure.
        self._peak: dict[tuple[str, str, int], tuple[int, float]] = {}
        # Per host: the newest TLS session with a ticket, and when it was kept.
        self._sessions: dict[tuple[str, str, int], tuple[float, ssl.SSLSession]] = {}
        # One CA store for every connection, loaded at the first https one: loading the
        # system's store costs 1.8 MB, not worth holding for plain HTTP or the echo provider.
        self._tls: ssl.SSLContext | None = None
        self._addresses: dict[tuple[str, int], tuple[float, list[Any]]] = {}
        self._resolving = threading.Lock()
        self._sweeper: gevent.Greenlet | None = None

    def take(self, url: urllib.parse.SplitResult) -> tuple[http.client.HTTPConnection, bool]:
        """A connection to the URL's host and whether it was reused; give_back() or
        discard() it when done."""
        key = _host_key(url)
        idle = self._idle.get(key, [])
        conn: http.client.HTTPConnection | None = None
        while idle:
            _, candidate = idle.pop()
            if candidate.sock is not None and not _socket_has_input(candidate.sock.fileno()):
                candidate.sock.settimeout(self._read_timeout)
                conn = candidate
                break
            candidate.close()  # the provider closed it while it idled
        reused = conn is not None
        if conn is None:
            conn = self._connect(key)
        in_use = self._in_use[key] = self._in_use.get(key, 0) + 1
        self._note_in_use(key, in_use)
        if reused:
            metrics.count("cloudchat_provider_connections_total", kind="reused")
        return conn, reused

    def _connect(self, key: tuple[str, str, int]) -> http.client.HTTPConnection:
        """A new connection, TLS handshake done (resumed when the host's ticket is taken)."""
        scheme, host, port = key
        conn = http.client.HTTPConnection(host, port, timeout=self._connect_timeout)
        conn.default_port = 443 if scheme == "https" else 80  # the Host header's port
        conn.auto_open = 0  # never a connection of http.client's own making
        sock = self._open_socket((host, port), self._connect_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if scheme == "https":
                if self._tls is None:
                    self._tls = ssl.create_default_context()
                sock = self._tls.wrap_socket(
                    sock,
                    server_hostname=host,
                    session=self._sessions.get(key, (0.0, None))[1],
                    do_handshake_on_connect=False,
                )
                self._handshake(sock)
                kind = "tls_resumed" if sock.session_reused else "tls_full"
            else:
                kind = "plain"
            sock.settimeout(self._read_timeout)  # from now on: the idle read timeout
        except (OSError, ValueError):
            sock.close()
            raise
        conn.sock = sock
        metrics.count("cloudchat_provider_connections_total", kind=kind)
        return conn

    def _handshake(self, sock: ssl.SSLSocket) -> None:
        """The TLS handshake, each step's crypto through the gate (if any).

        CHAT_CONNECT_TIMEOUT bounds the time spent waiting for the provider, not for the
        gate: 2,000 chats arriving together queue there for seconds, through no fault of
        the provider's.
        """
        left = self._connect_timeout
        sock.settimeout(0.0)  # do_handshake() returns at each wait instead of waiting
        while True:
            if self._gate is not None:
                self._gate.wait_turn(going_on=True)
            try:
                sock.do_handshake()
                return
            except ssl.SSLWantReadError:
                wait = gevent.socket.wait_read
            except ssl.SSLWantWriteError:
                wait = gevent.socket.wait_write
            timed_out = TimeoutError("TLS handshake timed out")
            if left <= 0:
                raise timed_out
            began = time.monotonic()
            wait(sock.fileno(), timeout=left, timeout_exc=timed_out)
            left -= time.monotonic() - began

    def _open_socket(self, address: tuple[str, int], timeout: float) -> socket.socket:
        """A TCP connection to the first of the host's addresses that accepts one."""
        error: OSError = OSError(f"no address for {address[0]}")
        for family, kind, proto, _, sockaddr in self._resolve(*address):
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(timeout)
                sock.connect(sockaddr)
                return sock
            except OSError as exc:
                sock.close()
                error = exc
        raise error

    def _resolve(self, host: str, port: int) -> list[Any]:
        """The host's addresses: an IP literal as it is, a name from a cache of a minute.

        gevent resolves in its thread pool: 500 visitors arriving at once would otherwise
        queue 500 lookups of the same name there before their first token.
        """
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            family = socket.AF_INET6 if literal.version == 6 else socket.AF_INET
            return [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port))]
        with self._resolving:  # one lookup per name; the others wait for its answer
            expires, found = self._addresses.get((host, port), (0.0, []))
            if expires <= time.monotonic():
                found = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
                self._addresses[(host, port)] = (time.monotonic() + _UPSTREAM_DNS_SECONDS, found)
            return found

    def answered(self, url: urllib.parse.SplitResult, conn: http.client.HTTPConnection) -> None:
        """A new connection got its response head: keep its TLS session for the next ones,
        unless one kept less than a second ago still does (reading it costs 50 us).

        (TLS 1.3 sends the ticket after the handshake; by the response it has arrived.)
        """
        key = _host_key(url)
        kept_at, _ = self._sessions.get(key, (-1.0, None))
        if time.monotonic() - kept_at < 1.0 and getattr(conn.sock, "session_reused", False):
            return
        session = getattr(conn.sock, "session", None)
        if session is not None and session.has_ticket:
            self._sessions[key] = (time.monotonic(), session)

    def give_back(self, url: urllib.parse.SplitResult, conn: http.client.HTTPConnection) -> None:
        """Keep a connection whose response was read to the end (or close it, when as many
        are idle as the host needed lately)."""
        key = _host_key(url)
        self._release(key)
        idle = self._idle.setdefault(key, [])
        now = time.monotonic()
        self._close_expired(idle, now)
        peak, since = self._peak.get(key, (0, 0.0))
        recent = peak if now - since <= self._idle_seconds else 0
        if len(idle) < min(self._max_idle, max(_UPSTREAM_IDLE_MIN, recent)):
            idle.append((now, conn))
            if self._sweeper is None:
                self._sweeper = gevent.spawn(self._sweep)
        else:
            conn.close()

    def discard(self, url: urllib.parse.SplitResult, conn: http.client.HTTPConnection) -> None:
        """Close a connection that cannot carry another request."""
        self._release(_host_key(url))
        conn.close()

    def _release(self, key: tuple[str, str, int]) -> None:
        # A connection in use up to now counts as recent use: a burst of answers longer
        # than idle_seconds is still what the next burst will look like.
        in_use = self._in_use.get(key, 0)
        self._note_in_use(key, in_use)
        self._in_use[key] = max(0, in_use - 1)

    def _note_in_use(self, key: tuple[str, str, int], in_use: int) -> None:
        """Raise the recent peak to in_use, or start it afresh once it is too old."""
        peak, since = self._peak.get(key, (0, 0.0))
        if in_use >= peak or time.monotonic() - since > self._idle_seconds:
            self._peak[key] = (in_use, time.monotonic())

    def _close_expired(
        self, idle: list[tuple[float, http.client.HTTPConnection]], now: float
    ) -> None:
        expired = 0
        while expired < len(idle) and now - idle[expired][0] > self._idle_seconds:
            idle[expired][1].close()
            expired += 1
        del idle[:expired]

    def _sweep(self) -> None:
        """While connections idle: close those idle longer than idle_seconds, so a quiet
        server holds no descriptors (nor buffers) for a burst long gone."""
        try:
            while any(self._idle.values()):
                gevent.sleep(max(1.0, self._idle_seconds / 4))
                now = time.monotonic()
                for idle in self._idle.values():
                    self._close_expired(idle, now)
        finally:
            self._sweeper = None

    def idle_count(self) -> int:
        """Idle connections kept now, all hosts."""
        return sum(len(idle) for idle in self._idle.values())

    def close(self) -> None:
        """Close every idle connection."""
        if self._sweeper is not None:
            self._sweeper.kill()
        for idle in self._idle.values():
            while idle:
                idle.pop()[1].close()


def _host_key(url: urllib.parse.SplitResult) -> tuple[str, str, int]:
    port = url.port or (443 if url.scheme == "https" else 80)
    return url.scheme, url.hostname or "", port


_CHUNK_SIZE_RE = re.compile(rb"[0-9A-Fa-f]{1,15}")
_CHUNK_LINE_MAX = 4096


class ResponseBody:
    """A provider's response body as it arrives: at each read, all that is in, de-chunked.

    http.client's read1() stops at every chunk boundary, and providers send each event as
    a chunk of its own: a loop that comes round to a stream and finds ten tokens waiting
    would still write them to the visitor one system call each.
    """

    def __init__(self, response: http.client.HTTPResponse, sock: Any = None) -> None:
        self._fp = response.fp
        # A TLS socket's read returns one TLS record, and providers send each event as a
        # record of its own: reads go on while more has arrived (see _read_arrived).
        self._tls = sock if hasattr(sock, "pending") else None
        self._arrived: Any = None  # a poll object watching the TLS socket
        if self._tls is not None:
            self._arrived = _real_poll()
            self._arrived.register(self._tls.fileno(), select.POLLIN)
        self._chunked = response.chunked
        self._left = response.length  # without chunking: bytes to come (None: until EOF)
        self._pending = b""  # chunk framing not yet complete
        self._in_chunk = 0  # data bytes left in the current chunk
        self._after_chunk = False  # the CRLF that ends a chunk's data is due
        self._in_trailers = False  # after the last chunk: trailer lines, then an empty one
        self._broken: ValueError | None = None  # bad framing after data not yet returned
        self.complete = False  # the body has been read to its very end

    @property
    def reusable(self) -> bool:
        """Read to its end and not a byte beyond: the connection can carry another reply."""
        return self.complete and not self._pending

    def read(self) -> bytes:
        """Body bytes that have arrived (waiting for some if none has); b"" at the end.

        ValueError for broken chunk framing or a connection closed inside the body;
        OSError (TimeoutError included) from the socket.
        """
        if not self._chunked:
            if self._left == 0:
                self.complete = True
                return b""
            data = self._read_arrived(65536 if self._left is None else min(65536, self._left))
            if not data:
                if self._left:
                    raise ValueError("connection closed before the end of the body")
                self.complete = True  # delimited by the connection's end
            elif self._left is not None:
                self._left -= len(data)
            return data
        while not self.complete:
            if self._broken is not None:
                raise self._broken
            data = self._read_arrived(65536)
            if not data:
                raise ValueError("connection closed inside a chunked body")
            out: list[bytes] = []
            try:
                self._dechunk(self._pending + data, out)
            except ValueError as exc:
                if not out:
                    raise
                self._broken = exc  # the data before the bad framing first
            if out:
                return b"".join(out)
        return b""

    def _read_arrived(self, limit: int) -> bytes:
        """Up to limit bytes: what has arrived, waiting for some if nothing has."""
        data = self._fp.read1(limit)
        if self._tls is None or not data:
            return data
        parts, size = [data], len(data)
        while size < limit and (self._tls.pending() or self._arrived.poll(0)):
            more = self._fp.read1(limit - size)  # (the rest of a record may still be due)
            if not more:
                break
            parts.append(more)
            size += len(more)
        return b"".join(parts)

    def _dechunk(self, buf: bytes, out: list[bytes]) -> None:
        """Append the chunk data in buf to out; keep an incomplete tail for the next read."""
        pos = 0
        while pos < len(buf) and not self.complete:
            if self._in_chunk:
                data = buf[pos : pos + self._in_chunk]
                out.append(data)
                pos += len(data)
                self._in_chunk -= len(data)
                self._after_chunk = self._in_chunk == 0
                continue
            if self._after_chunk:
                if len(buf) - pos < 2:
                    break
                if buf[pos : pos + 2] != b"\r\n":
                    raise ValueError("chunk data not followed by CRLF")
                pos += 2
                self._after_chunk = False
                continue
            end = buf.find(b"\r\n", pos)
            if end < 0:
                if len(buf) - pos > _CHUNK_LINE_MAX:
                    raise ValueError("chunk size line too long")
                break
            line, pos = buf[pos:end], end + 2
            if self._in_trailers:
                self.complete = not line  # trailer fields themselves are of no use here
                continue
            size = line.split(b";", 1)[0].strip()  # chunk extensions are ignored
            if not _CHUNK_SIZE_RE.fullmatch(size):
                raise ValueError(f"bad chunk size line {line[:40]!r}")
            self._in_chunk = int(size, 16)
            self._in_trailers = self._in_chunk == 0
        self._pending = buf[pos:]


class ChatStream:
    """One streamed completion: iterate (kind, value) events; abort() ends it from outside."""

    def __init__(
        self,
        provider: str,
        url: urllib.parse.SplitResult,
        pool: UpstreamPool,
        conn: http.client.HTTPConnection,
        response: http.client.HTTPResponse,
    ) -> None:
        self.provider = provider
        self.aborted = False
        self.ended_by_server = False
        self._url = url
        self._pool = pool
        self._conn = conn
        self._response = response
        self._body = ResponseBody(response, conn.sock)
        self._finished = False

    def events(self) -> Iterator[list[tuple[str, Any]]]:
        """Batches of ('text' | 'reasoning', str) and ('usage', dict) events until [DONE].

        One batch per read from the provider: under load a read holds several events,
        and the visitor then gets them in one write instead of one system call each.
        """
        pending = b""
        data_lines: list[bytes] = []
        event_size = 0
        while True:
            batch: list[tuple[str, Any]] = []
            try:
                chunk = self._body.read()
            except TimeoutError as exc:
                raise ProviderError(self.provider, "network", "stream went silent") from exc
            except (OSError, http.client.HTTPException, ValueError) as exc:
                # The provider answered and then broke off: its failure, not the network's.
                raise ProviderError(self.provider, "server", f"stream broke: {exc!r}") from exc
            if not chunk:
                raise ProviderError(self.provider, "server", "stream ended before [DONE]")
            pending += chunk
            if b"\n" not in chunk and len(pending) > _SSE_MAX_LINE:
                raise ProviderError(self.provider, "server", "stream line too long")
            # Whole lines only: an event or a UTF-8 character split across reads waits
            # here for its rest.
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                line = raw[:-1] if raw.endswith(b"\r") else raw
                if line.startswith(b":"):
                    continue  # comment, e.g. ": keep-alive"
                if line:
                    field, _, value = line.partition(b":")
                    if field == b"data":
                        data_lines.append(value[1:] if value.startswith(b" ") else value)
                        event_size += len(value)
                        if event_size > _SSE_MAX_EVENT:
                            if batch:
                                yield batch
                            raise ProviderError(self.provider, "server", "stream event too long")
                    continue
                if not data_lines:
                    continue
                data = b"\n".join(data_lines)
                data_lines = []
                event_size = 0
                if data.strip() == b"[DONE]":
                    self._finished = True
                    if batch:
                        yield batch
                    return
                try:
                    batch.extend(self._chunk_events(data))
                except ProviderError:
                    if batch:  # what came before the bad event is the visitor's
                        yield batch
                    raise
            if batch:
                yield batch

    def _chunk_events(self, data: bytes) -> Iterator[tuple[str, Any]]:
        try:
            chunk = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise ProviderError(self.provider, "server", "invalid JSON in the stream") from None
        if not isinstance(chunk, dict):
            raise ProviderError(self.provider, "server", "stream chunk is not an object")
        if chunk.get("error"):
            raise ProviderError(self.provider, "server", f"error in stream: {chunk['error']}")
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if not isinstance(delta, dict):
                continue
            reasoning = delta.get("reasoning_content")
            if isinstance(reasoning, str) and reasoning:
                yield "reasoning", reasoning
            content = delta.get("content")
            if isinstance(content, str) and content:
                yield "text", content
        if isinstance(chunk.get("usage"), dict):
            yield "usage", chunk["usage"]

    def abort(self, by_server: bool = False) -> None:
        """Drop the provider connection now (the visitor left, or by_server: the server is
        stopping and its grace period is over); events() then stops."""
        self.aborted = True
        self.ended_by_server = by_server
        sock = self._conn.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Return a cleanly finished connection to the pool; close any other."""
        if self._finished and not self.aborted and not self._response.will_close:
            try:
                # The rest of the body (the terminating chunk, usually), so that the next
                # reply on this connection starts clean; a stream going on after [DONE]
                # is not worth waiting for.
                extra = 0
                while not self._body.complete and extra < _SSE_MAX_LINE:
                    extra += len(self._body.read())
                if self._body.reusable:
                    self._response.close()  # http.client's turn is over; the socket stays
                    self._pool.give_back(self._url, self._conn)
                    return
            except (OSError, ValueError) as exc:
                log.debug("provider connection not reusable: %s", exc)
        self._pool.discard(self._url, self._conn)


def open_chat_stream(
    cfg: Config, provider: ProviderConfig, pool: UpstreamPool, messages: list[dict]
) -> ChatStream:
    """Send a chat request; a stream once the provider answered 200, else ProviderError."""
    url = urllib.parse.urlsplit(provider.base_url + "/chat/completions")
    body = chat_request_body(cfg, provider, messages)
    headers = {
        "Authorization": f"Bearer {provider.api_key}",
        "Content-Type": "application/json",
        "Accept": "text/event-stream",
        "User-Agent": f"cloudchat/{__version__}",
    }
    for attempt in (1, 2):
        try:
            conn, reused = pool.take(url)
        except (OSError, ValueError) as exc:
            raise ProviderError(provider.name, "network", f"connect failed: {exc}") from exc
        sent_at = time.monotonic()
        try:
            conn.request("POST", url.path, body, headers)
            response = conn.getresponse()
            break
        except (OSError, http.client.HTTPException) as exc:
            pool.discard(url, conn)
            # A kept-alive connection the provider had already closed fails at once: try
            # once more on a fresh one. A timeout, or a close after the provider held the
            # request a while, means it had the request: sending it again would bill twice.
            stale = isinstance(exc, (http.client.RemoteDisconnected, ConnectionError))
            if reused and stale and attempt == 1 and time.monotonic() - sent_at < 0.5:
                continue
            raise ProviderError(provider.name, "network", f"no answer: {exc!r}") from exc
    if not reused:
        pool.answered(url, conn)
    if response.status != 200:
        try:
            detail = response.read(2000).decode("utf-8", "replace")
        except (OSError, http.client.HTTPException):
            detail = ""
        pool.discard(url, conn)
        kind = (
            "auth"
            if response.status in (401, 402, 403)
            else "rate"
            if response.status == 429
            else "server"
        )
        raise ProviderError(
            provider.name,
            kind,
            f"HTTP {response.status}: {_escape(detail.strip())[:300]}",
            response.getheader("Retry-After"),
        )
    return ChatStream(provider.name, url, pool, conn, response)


def echo_events(message: str) -> Iterator[list[tuple[str, Any]]]:
    """The offline echo provider's answer: the message back, a word at a time."""
    words = f"Echo: {message}".split(" ")
    for index, word in enumerate(words):
        yield [("text", word if index == len(words) - 1 else word + " ")]


def history_owner(user: User | None, visitor: str | None) -> str | None:
    """Whose history a chat joins: the account when logged in, else the visitor id."""
    return f"user:{user.id}" if user is not None else visitor


def history_key(owner: str) -> str:
    return f"chat:{token_hash(owner)[:32]}"


# What Redis spends on a list key beyond its items' bytes, and on each item (measured with
# MEMORY USAGE on Redis 7, rounded up): the history budget counts these too.
HISTORY_KEY_OVERHEAD = 128
HISTORY_ITEM_OVERHEAD = 24
# jemalloc rounds each item up to its size class (up to a quarter more: 20,440 characters of
# history took 1.18 x their bytes), percent.
HISTORY_ALLOCATOR_FACTOR = 125


def count_chat_and_load_history(
    kv: KeyValueStore,
    cfg: Config,
    checks: Sequence[LimitCheck],
    owner: str | None,
    new_visitor_check: LimitCheck | None = None,
) -> tuple[int | None, list[dict[str, str]], bool]:
    """Count a chat request against its limits and read the owner's recent rounds, in one
    round trip.

    Returns the seconds to wait if over a chat limit (else None); the messages, oldest
    first; and whether a new visitor may be given an id (new_visitor_check, the address's
    limit on new visitor ids, is not exceeded).
    """
    # The new-id limit goes right after the address's: over it, counting stops there, so
    # an address past its share of new ids gets no key made per id it is offered.
    every_check = list(checks)
    if new_visitor_check:
        every_check.insert(1, new_visitor_check)
    reads_history = owner is not None and new_visitor_check is None and cfg.max_history > 0
    counts, items = kv.hit_many(
        rate_limit_windows(every_check), read_list=history_key(owner) if reads_history else None
    )
    may_issue = new_visitor_check is None or counts[1][0] <= new_visitor_check[0].limit
    if new_visitor_check:
        del counts[1]
    wait = seconds_until_allowed(checks, counts)
    return wait, parse_history(items)[-2 * cfg.max_history :], may_issue


def parse_history(items: Sequence[str]) -> list[dict[str, str]]:
    """The messages of a history list's items (anything unreadable left out)."""
    messages = []
    for item in items:
        try:
            message = json.loads(item)
        except ValueError:
            continue
        if isinstance(message, dict) and message.get("role") in ("user", "assistant"):
            messages.append({"role": message["role"], "content": str(message.get("content"))})
    return messages


def _history_item(role: str, content: str) -> str:
    return json.dumps({"role": role, "content": content}, ensure_ascii=False)


def save_round(
    kv: KeyValueStore,
    cfg: Config,
    owner: str,
    history: list[dict[str, str]],
    question: str,
    answer: str,
) -> bool:
    """Append one finished round (question and answer together) to the owner's history,
    within its bounds; True if it was kept.

    Bounds, so that nothing a client does can fill Redis (and evict what protects
    accounts): MAX_HISTORY rounds and CHAT_HISTORY_MAX_BYTES per owner, older rounds
    dropped first; and CHAT_HISTORY_BUDGET_MB for everyone together. A history lives
    CHAT_HISTORY_TTL seconds after its last write (reading does not extend it), so every
    live history was written within the last two fixed windows of that length: the bytes
    written in those two windows bound what all histories hold. Beyond the budget, new
    rounds are not kept (the chat still answers).
    """
    if cfg.max_history == 0:
        return False
    items = [_history_item("user", question), _history_item("assistant", answer)]
    size = sum(len(item.encode()) for item in items)
    if size > cfg.chat_history_max_bytes:
        log.info("chat round not kept: longer than CHAT_HISTORY_MAX_BYTES")
        return False
    keep = 2
    room = 2 * cfg.max_history - 2  # items of older rounds that may stay
    older = [_history_item(m["role"], m["content"]) for m in (history[-room:] if room else [])]
    while len(older) >= keep:
        pair = sum(len(item.encode()) for item in older[-keep : len(older) - keep + 2])
        if size + pair > cfg.chat_history_max_bytes:
            break
        size += pair
        keep += 2
    else:
        # All of it fits: keep MAX_HISTORY rounds, so that a round another tab saved since
        # this request read the history is not trimmed away with it.
        keep = 2 * cfg.max_history
    window = cfg.chat_history_ttl
    bucket = int(time.time()) // window
    cost = (
        size * HISTORY_ALLOCATOR_FACTOR // 100 + HISTORY_KEY_OVERHEAD + HISTORY_ITEM_OVERHEAD * keep
    )
    spent = kv.add_to_windows(f"histbudget:{bucket}", f"histbudget:{bucket - 1}", cost, 2 * window)
    if spent > cfg.chat_history_budget_mb * 1024 * 1024:
        outage_log.warning(
            "chat history budget reached", "new rounds are not kept (CHAT_HISTORY_BUDGET_MB)"
        )
        return False
    kv.append_list(history_key(owner), items, keep, window)
    return True


def read_history(kv: KeyValueStore, owner: str) -> list[dict[str, str]]:
    """The owner's kept rounds, oldest first."""
    return parse_history(kv.get_list(history_key(owner)))


def clear_history(kv: KeyValueStore, owner: str) -> None:
    """Forget the owner's history."""
    kv.delete(history_key(owner))


# -- usage and daily budgets ------------------------------------------------------------------

# Budget counters live two days: today's, and yesterday's for an answer that ends after
# midnight UTC.
BUDGET_KEY_SECONDS = 2 * 86400


@dataclasses.dataclass(frozen=True)
class ChatScope:
    """Whose tokens an answer counts toward: the account, or the anonymous visitor (by its
    id; none when the chat keeps no history), and the client's address."""

    user_id: int | None
    visitor: str | None
    address: str

    @property
    def owner(self) -> str:
        """The usage row's and the budget counter's name for the account or visitor."""
        if self.user_id is not None:
            return f"user:{self.user_id}"
        return f"visitor:{token_hash(self.visitor)[:32]}" if self.visitor else ""


def utc_day(moment: dt.datetime | None = None) -> str:
    """The UTC day of a moment (now by default), YYYY-MM-DD."""
    return (moment or utcnow()).strftime("%Y-%m-%d")


def seconds_to_utc_midnight(moment: dt.datetime | None = None) -> int:
    """Whole seconds until the next UTC day begins (at least 1)."""
    now = moment or utcnow()
    midnight = dt.datetime.combine(now.date() + dt.timedelta(days=1), dt.time(), dt.UTC)
    return max(1, math.ceil((midnight - now).total_seconds()))


def budget_key(day: str, kind: str, whose: str = "") -> str:
    """A day's token counter: the site's, an owner's or an address's (hashed names)."""
    return f"budget:{day}:{kind}:{token_hash(whose)[:32] if whose else 'all'}"


def _ready_key(day: str) -> str:
    # Present while the day's counters hold everything SQL knows (set by a rebuild).
    return f"budget:{day}:ready"


def budget_counters(scope: ChatScope, day: str) -> list[tuple[str, str]]:
    """The (kind, key) of every counter an answer of this scope adds to: the site, the
    account or visitor, and for an anonymous one its address."""
    counters = [("site", budget_key(day, "site"))]
    if scope.owner:
        counters.append(("owner", budget_key(day, "owner", scope.owner)))
    if scope.user_id is None:
        counters.append(("ip", budget_key(day, "ip", scope.address)))
    return counters


def budget_limits(cfg: Config, scope: ChatScope) -> dict[str, int]:
    """The daily limits that apply to a scope, by counter kind (0 = unlimited: left out)."""
    personal = (
        cfg.chat_daily_tokens_user if scope.user_id is not None else cfg.chat_daily_tokens_anon
    )
    limits = {"site": cfg.chat_daily_tokens, "owner": personal}
    if scope.user_id is None:
        limits["ip"] = cfg.chat_daily_tokens_anon
    return {kind: limit for kind, limit in limits.items() if limit > 0}


def read_budget_counters(
    kv: KeyValueStore, sql: SqlStore, day: str, keys: Sequence[str]
) -> list[int]:
    """Today's token counts of `keys`, from the key-value store; after a loss of its keys
    (a Redis restart, a new embedded process) rebuilt from SQL first."""
    values = kv.get_many([_ready_key(day), *keys])
    if values[0] is None:
        rebuild_budget_counters(kv, sql, day)
        values = kv.get_many([_ready_key(day), *keys])
    return [int(value or 0) for value in values[1:]]


def rebuild_budget_counters(kv: KeyValueStore, sql: SqlStore, day: str) -> None:
    """Set a day's counters to what chat_usage holds. An answer that ends while this runs
    may be counted twice or not at all: the error is at most the answers in flight."""
    totals: dict[str, int] = {budget_key(day, "site"): 0}
    for owner, user_id, address, tokens in day_usage_totals(sql, day):
        totals[budget_key(day, "site")] += tokens
        if owner:
            key = budget_key(day, "owner", owner)
            totals[key] = totals.get(key, 0) + tokens
        if user_id is None:
            key = budget_key(day, "ip", address)
            totals[key] = totals.get(key, 0) + tokens
    items = [(key, str(value)) for key, value in totals.items()]
    kv.set_many([*items, (_ready_key(day), "1")], BUDGET_KEY_SECONDS)
    log.info("chat budgets: the day's counters rebuilt from SQL (%d of them)", len(items))


def over_chat_budget(kv: KeyValueStore, sql: SqlStore, cfg: Config, scope: ChatScope) -> int | None:
    """Seconds until the next UTC day if a daily budget of this scope is spent, else None.
    One key-value round trip, no SQL (but after a loss of the counters)."""
    limits = budget_limits(cfg, scope)
    if not limits:
        return None
    day = utc_day()
    counters = [(kind, key) for kind, key in budget_counters(scope, day) if kind in limits]
    counts = read_budget_counters(kv, sql, day, [key for _, key in counters])
    for (kind, _), count in zip(counters, counts, strict=True):
        if count >= limits[kind]:
            metrics.count("cloudchat_chat_budget_refusals_total", budget=kind)
            return seconds_to_utc_midnight()
    return None


def count_answer_tokens(
    kv: KeyValueStore,
    sql: SqlStore,
    scope: ChatScope,
    model: tuple[str, str],
    tokens: tuple[int, int],
    estimated: bool,
) -> None:
    """Record one answer's (prompt, completion) tokens: its usage row in SQL (one upsert)
    and today's budget counters."""
    day = utc_day()
    prompt, completion = tokens
    add_chat_usage(
        sql, day, (scope.owner, scope.user_id, scope.address), model, prompt, completion, estimated
    )
    counters = budget_counters(scope, day)
    kv.add_many([(key, prompt + completion) for _, key in counters], BUDGET_KEY_SECONDS)
    metrics.count("cloudchat_chat_tokens_total", prompt, provider=model[0], kind="prompt")
    metrics.count("cloudchat_chat_tokens_total", completion, provider=model[0], kind="completion")


def reported_tokens(usage: Any) -> tuple[int, int] | None:
    """(prompt, completion) tokens of a provider's usage report, if it is a sane one."""
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    sane = all(
        isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 10**9
        for n in (prompt, completion)
    )
    return (prompt, completion) if sane else None


def estimated_tokens(characters: int) -> int:
    """Tokens of text without a usage report: a character count / 4, rounded up."""
    return (characters + 3) // 4


class VisitorLeft(Exception):
    """The visitor hung up before the answer's first token."""


class HangupWatch:
    """Watches the visitor's connection from the moment the chat request has been read: a
    hang-up aborts the provider stream in progress at once, whether or not it has sent a
    token yet, so a slow provider (a thinking model) is not kept answering no one."""

    def __init__(self, client: socket.socket | None) -> None:
        self.left = False
        self._stream: ChatStream | None = None
        self._watcher = gevent.spawn(self._watch, client) if client is not None else None

    def _watch(self, client: socket.socket) -> None:
        # The request has been read: readable now means the visitor hung up (or pipelined
        # a request, which is left for the server to read).
        try:
            gevent.socket.wait_read(client.fileno())
            if client.recv(1, socket.MSG_PEEK) != b"":
                return
        except OSError:
            pass
        self.left = True
        if self._stream is not None:
            self._stream.abort()

    def attach(self, stream: ChatStream) -> None:
        """The provider stream to abort on a hang-up (at once if it already happened)."""
        self._stream = stream
        if self.left:
            stream.abort()

    def stop(self) -> None:
        """Stop watching."""
        # Dropping the reference too: watcher and watch refer to each other, and a cycle
        # would keep the dead greenlet until the collector's next full pass.
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.kill()


CHAT_BUSY_FLUSH_SECONDS = 0.05  # 20 writes a second: still a smooth stream to read
# While a burst of chats waits to be set up, streams already answering write less often:
# the loop's time goes to the first tokens of those still waiting for one. (Each wait is
# drawn from half to one and a half times these, so that streams begun together do not
# all wake in the same turn.)
CHAT_BURST_FLUSH_SECONDS = 0.2
CHAT_FAILURES = {
    "auth": (503, "chat_unavailable", "Chat is unavailable right now"),
    "rate": (429, "provider_rate_limited", "The model provider is busy, try again shortly"),
    "server": (502, "provider_error", "The model provider failed, try again"),
    "network": (503, "provider_unreachable", "The model provider cannot be reached right now"),
}


class ChatRelay:
    """The chats in flight: opens the provider stream of each (start), relays it to the
    visitor (relay), and, when the server stops, ends those still running (end_streams)."""

    def __init__(self, cfg: Config, kv: KeyValueStore, sql: SqlStore) -> None:
        self._cfg = cfg
        self._kv = kv
        self._sql = sql
        self.setup_gate = TurnGate(CHAT_SETUP_SECONDS_PER_TURN)
        self.upstream = UpstreamPool(
            cfg.chat_connect_timeout,
            cfg.chat_read_timeout,
            cfg.chat_pool_idle_seconds,
            cfg.chat_pool_max_idle,
            self.setup_gate,
        )
        self.open_streams = 0  # chat answers being relayed right now
        self._live: set[ChatStream] = set()
        self._stopping = False  # the grace is over: a stream still waiting gets a 503

    def start(
        self, messages: list[dict], watch: HangupWatch
    ) -> tuple[ChatStream | None, Iterator[list[tuple[str, Any]]], list[tuple[str, Any]]]:
        """Open a stream with the first provider that gets as far as a first token.

        Returns the stream (None for the echo provider), its remaining events and the
        events already read. Providers are tried in order until one delivers; then no
        other is tried. VisitorLeft when the visitor hangs up first.
        """
        cfg = self._cfg
        if not cfg.chat_providers:
            return None, echo_events(messages[-1]["content"]), []
        # The route's checks waited on Redis: what follows (the request, a connection)
        # runs when the answer comes, through the gate again, ahead of chats not begun.
        self.setup_gate.wait_turn(going_on=True)
        failure: ProviderError | None = None
        for provider in cfg.chat_providers:
            stream = None
            try:
                stream = open_chat_stream(cfg, provider, self.upstream, messages)
                self._live.add(stream)
                watch.attach(stream)
                batches = stream.events()
                first: list[tuple[str, Any]] = []
                for batch in batches:
                    first.extend(batch)
                    if any(kind != "usage" for kind, _ in batch):
                        break
                else:
                    raise ProviderError(
                        provider.name, "server", "the answer ended without any text"
                    )
                return stream, batches, first
            except ProviderError as exc:
                if stream is not None:
                    self._live.discard(stream)
                    stream.close()
                if watch.left:
                    raise VisitorLeft() from None
                if self._stopping:
                    raise ApiError(
                        503,
                        "unavailable",
                        "The server is restarting, try again",
                        {"Retry-After": "1"},
                    ) from None
                log.warning("chat provider failed before the first token: %s", exc)
                metrics.count(
                    "cloudchat_provider_failures_total", provider=provider.name, kind=exc.kind
                )
                failure = exc
        assert failure is not None
        status, code, message = CHAT_FAILURES[failure.kind]
        retry = failure.retry_after if failure.kind == "rate" else None
        headers = {"Retry-After": retry} if retry and retry.isdigit() else {}
        raise ApiError(status, code, message, headers)

    def relay(
        self,
        stream: ChatStream | None,
        batches: Iterator[list[tuple[str, Any]]],
        first: list[tuple[str, Any]],
        owner: str | None,
        history: list[dict[str, str]],
        question: str,
        watch: HangupWatch,
        scope: ChatScope,
        prompt_chars: int,
    ) -> Iterator[bytes]:
        """The visitor's NDJSON stream; the round joins the owner's history (none: a
        visitor over its address's limit of new ids, who keeps nothing) once complete.
        Its tokens count toward the scope's usage and budgets, finished or broken off.

        Lines go out as tokens arrive. With more than CHAT_BUSY_STREAMS answers streaming
        at once, a stream writes at most every CHAT_BUSY_FLUSH_SECONDS, several tokens a
        write: the loop is then late for every stream anyway, and each write it spares is
        a system call and a wake-up it can spend on the streams still waiting for a token.
        """
        cfg = self._cfg
        reply: list[str] = []
        relayed = {"text": 0, "reasoning": 0}  # characters, each up to CHAT_MAX_REPLY_CHARS
        usage = None
        self.open_streams += 1
        try:
            for batch in itertools.chain([first], batches):
                lines = []
                for kind, value in batch:
                    if kind == "usage":
                        usage = value
                        continue
                    relayed[kind] += len(value)
                    if relayed[kind] > cfg.chat_max_reply_chars:
                        # A reply that never ends would grow without bound here and in history.
                        log.warning("chat reply over CHAT_MAX_REPLY_CHARS: cut off, not kept")
                        cut = {"error": "The answer was too long and was cut off"}
                        lines.append(_json_bytes(cut))
                        yield b"".join(lines) + b"\n"
                        return
                    if kind == "text":
                        reply.append(value)
                    lines.append(_json_bytes({kind: value}) + b"\n")
                if lines:
                    yield b"".join(lines)
                    if self.setup_gate.queued:
                        gevent.sleep(CHAT_BURST_FLUSH_SECONDS * (0.5 + random.random()))
                    elif self.open_streams > cfg.chat_busy_streams:
                        gevent.sleep(CHAT_BUSY_FLUSH_SECONDS * (0.5 + random.random()))
            answer = "".join(reply)
            if answer and owner is not None:
                try:
                    save_round(self._kv, cfg, owner, history, question, answer)
                except StoreUnavailable as exc:
                    outage_log.warning("chat round not saved", exc)
            yield _json_bytes({"done": True, "usage": usage} if usage else {"done": True}) + b"\n"
        except ProviderError as exc:
            if stream is not None and stream.ended_by_server:
                log.warning("chat cut off at shutdown: the grace period ended mid-answer")
                yield _json_bytes({"error": "The server is restarting, please ask again"}) + b"\n"
                return
            if stream is not None and stream.aborted:
                log.info("visitor left mid-answer: provider connection closed, reply dropped")
                return
            log.warning("chat failed mid-answer: %s", exc)
            provider = stream.provider if stream is not None else "echo"
            metrics.count("cloudchat_provider_failures_total", provider=provider, kind="mid_answer")
            yield _json_bytes({"error": "The model provider failed mid-answer, please try again"})
            yield b"\n"
        finally:
            self.open_streams -= 1
            watch.stop()
            if stream is not None:
                self._live.discard(stream)
                stream.close()
            reply_chars = relayed["text"] + relayed["reasoning"]
            self._count_tokens(stream, scope, usage, prompt_chars, reply_chars)

    def _count_tokens(
        self,
        stream: ChatStream | None,
        scope: ChatScope,
        usage: Any,
        prompt_chars: int,
        reply_chars: int,
    ) -> None:
        provider = stream.provider if stream is not None else "echo"
        model = next((p.model for p in self._cfg.chat_providers if p.name == provider), provider)
        reported = reported_tokens(usage)
        tokens = reported or (estimated_tokens(prompt_chars), estimated_tokens(reply_chars))
        try:
            count_answer_tokens(
                self._kv, self._sql, scope, (provider, model), tokens, reported is None
            )
        except ReferenceGone:
            log.info("chat usage not recorded: the account was deleted meanwhile")
        except StoreUnavailable as exc:
            outage_log.warning("chat usage not recorded", exc)

    def end_streams(self) -> None:
        """The grace period is over: every provider stream in flight ends now, and its
        visitor gets an {"error"} line instead of a connection cut without a word."""
        self._stopping = True
        for stream in list(self._live):
            stream.abort(by_server=True)

    def close(self) -> None:
        """Close the idle provider connections."""
        self.upstream.close()


###############################################################################
# App: request plumbing, error envelope, routes
###############################################################################


class HealthCheck:
    """Pings Redis and the database; callers arriving while a check runs share its answer."""

    def __init__(self, sql: SqlStore, kv: KeyValueStore, timeout: float) -> None:
        self._sql = sql
        self._kv = kv
        self._timeout = timeout
        self._running: gevent.event.AsyncResult | None = None

    def __call__(self) -> dict[str, bool]:
        """{"redis": bool, "db": bool}, within HEALTH_TIMEOUT."""
        if self._running is not None:
            # A burst of probes (load balancers, monitors) costs one round trip each way.
            return self._running.get()
        self._running = running = gevent.event.AsyncResult()
        try:
            result = self._check()
            running.set(result)
            return result
        except BaseException as exc:
            running.set_exception(exc)
            raise
        finally:
            self._running = None

    def _check(self) -> dict[str, bool]:
        kv, sql, timeout = self._kv, self._sql, self._timeout
        if isinstance(kv, MemoryStore) and isinstance(sql, SqliteStore):
            # Nothing here waits on a network: no greenlets needed.
            return {"redis": _probe("redis", kv.ping), "db": _probe("db", sql.ping)}
        jobs = {
            "redis": gevent.spawn(_probe, "redis", kv.ping),
            "db": gevent.spawn(_probe, "db", sql.ping),
        }
        gevent.joinall(list(jobs.values()), timeout=timeout)
        result = {}
        for name, job in jobs.items():
            if not job.ready():
                log.warning("health check: %s gave no answer within %g s", name, timeout)
                job.kill(block=False)
            result[name] = bool(job.ready() and job.successful() and job.value)
        return result


def _probe(name: str, ping: Callable[[], None]) -> bool:
    try:
        ping()
        return True
    except Exception as exc:
        outage_log.warning(f"health check: {name} down", exc)
        return False


@dataclasses.dataclass
class Services:
    """What the handlers work with: configuration, stores, health check, password rules and
    hashing, background jobs and mail, the chats in flight."""

    cfg: Config
    sql: SqlStore
    kv: KeyValueStore
    health: HealthCheck
    passwords: PasswordPolicy
    hasher: PasswordHasher
    jobs: BackgroundJobs
    mailer: Mailer
    chat: ChatRelay

    @functools.cached_property
    def secret(self) -> bytes:
        """The key that signs visitor ids and device cookies: SECRET_KEY, or in development
        one kept in the database (read at first use, so a server starts while it is down)."""
        return (self.cfg.secret_key or get_or_create_server_secret(self.sql, "cookies")).encode()

    def close(self) -> None:
        """Release the stores' and the providers' connections."""
        self.chat.close()
        self.kv.close()
        self.sql.close()


SECURITY_HEADERS = (
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "SAMEORIGIN"),
    ("Referrer-Policy", "strict-origin-when-cross-origin"),
)
_SECURITY_HEADER_NAMES = {name.lower() for name, _ in SECURITY_HEADERS}
# On every other answer: no type sniffing (a chat line echoing <script> must never render as
# HTML), and for JSON and chat streams a policy that lets nothing load or frame them.
NOSNIFF = ("X-Content-Type-Options", "nosniff")
DATA_CSP = ("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'")
_DATA_TYPES = ("application/json", "application/x-ndjson")
_PRIVATE_PATHS = frozenset(("/deepseek_chat", "/reset_chat", "/chat/history", "/chat/usage"))

_DEFAULT_ERRORS = {
    400: ("bad_request", "Bad request"),
    404: ("not_found", "Not found"),
    405: ("method_not_allowed", "Method not allowed"),
    413: ("body_too_large", "Request body too large"),
    500: ("internal_error", "Internal server error"),
}


def error_body(error: ApiError) -> bytes:
    """The one JSON envelope of every failure; sets status and headers on the response."""
    bottle.response.status = error.status
    bottle.response.content_type = "application/json"
    for name, value in error.headers.items():
        bottle.response.set_header(name, value)
    return _json_bytes({"ok": False, "error": error.message, "code": error.code})


def _request_id() -> str:
    return bottle.request.environ.get("cloudchat.request_id", "")


def api_route(callback: Callable[..., Any]) -> Callable[..., Any]:
    """Bottle plugin: dict results become JSON; every failure becomes the JSON envelope."""

    @functools.wraps(callback)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            result = callback(*args, **kwargs)
        except ApiError as exc:
            return error_body(exc)
        except StoreUnavailable as exc:
            outage_log.warning("dependency unavailable, answered 503", exc)
            return error_body(
                ApiError(503, "unavailable", "Service temporarily unavailable, try again shortly")
            )
        except bottle.HTTPResponse:
            raise
        except Exception:
            log.exception("unhandled error rid=%s", _request_id())
            return error_body(
                ApiError(500, "internal_error", f"Internal server error (request {_request_id()})")
            )
        if isinstance(result, dict):
            bottle.response.content_type = "application/json"
            return _json_bytes(result)
        return result

    return wrapper


def _bottle_error(error: bottle.HTTPError) -> bytes:
    """Bottle's own failures (no route, wrong method) in the same JSON envelope."""
    if error.status_code >= 500 and error.exception is not None:
        log.error("bottle error rid=%s: %r", _request_id(), error.exception)
    code, message = _DEFAULT_ERRORS.get(error.status_code, ("error", "Request failed"))
    return error_body(ApiError(error.status_code, code, message))


def read_json_object(max_bytes: int, body_timeout: float = 20.0) -> dict[str, Any]:
    """The request body as a JSON object; {} when there is none; ApiError otherwise."""
    environ = bottle.request.environ
    content_type = environ.get("CONTENT_TYPE", "")
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type and media_type != "application/json" and not media_type.endswith("+json"):
        raise ApiError(415, "unsupported_media_type", "Send the body as application/json")
    length_header = environ.get("CONTENT_LENGTH") or ""
    try:
        length = int(length_header) if length_header else None
    except ValueError:
        length = -1
    if length is not None and length < 0:
        raise ApiError(400, "bad_request", "Invalid Content-Length")
    if length is not None and length > max_bytes:
        bottle.response.set_header("Connection", "close")  # and do not read it at all
        raise ApiError(413, "body_too_large", f"Request body exceeds {max_bytes} bytes")
    stream = environ["wsgi.input"]
    try:
        # The whole body within one deadline: a client trickling it byte by byte would
        # otherwise hold a handler as long as each byte beats the socket timeout.
        with gevent.Timeout(body_timeout):
            raw = stream.read(length) if length is not None else stream.read(max_bytes + 1)
    except gevent.Timeout:
        bottle.response.set_header("Connection", "close")
        raise ApiError(408, "request_timeout", "The request body arrived too slowly") from None
    if len(raw) > max_bytes:
        raise ApiError(413, "body_too_large", f"Request body exceeds {max_bytes} bytes")
    if not raw.strip():
        return {}
    if not media_type:
        # A no-cors fetch() with a Blob body sends no Content-Type and needs no preflight:
        # only a body declared as JSON is read.
        raise ApiError(415, "unsupported_media_type", "Send the body as application/json")
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        # RecursionError: a few thousand nested brackets, well inside the size limit.
        raise ApiError(400, "invalid_json", "Request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_json", "Request body must be a JSON object")
    return body


def str_field(body: Mapping[str, Any], name: str) -> str | None:
    """A string field of the body, None when absent or null; a 400 for any other type."""
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ApiError(400, "invalid_input", f"Field '{name}' must be a string")
    if "\x00" in value:
        raise ApiError(400, "invalid_input", f"Field '{name}' contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # JSON can spell lone surrogates (\ud800) that no database column can store.
        raise ApiError(400, "invalid_input", f"Field '{name}' is not valid Unicode") from None
    return value


def _request_id_from(incoming: str) -> str:
    """The proxy's request id (nginx's $request_id) as a UUID, or a fresh UUID."""
    if incoming and len(incoming) <= 64:
        try:
            return str(uuid.UUID(incoming))
        except ValueError:
            pass
    return str(uuid.uuid4())


STATE_CHANGING = frozenset(("POST", "PUT", "PATCH", "DELETE"))


def cross_site_refusal(
    environ: Mapping[str, Any], cfg: Config, site_origins: frozenset[str]
) -> bool:
    """True for a state-changing request a browser sent from another site: marked
    `Sec-Fetch-Site: cross-site`, or with an Origin that is neither this server's own nor
    the site's (FRONTEND_BASE_URL, ALLOWED_ORIGINS). No Origin at all (curl) passes."""
    if environ.get("REQUEST_METHOD") not in STATE_CHANGING:
        return False
    if environ.get("HTTP_SEC_FETCH_SITE", "").lower() == "cross-site":
        return True
    origin = environ.get("HTTP_ORIGIN")
    if origin is None:
        return False
    found = web_origin(origin)
    if found is None:
        return True  # "null" (a sandboxed frame, a file://) or garbage
    if found in site_origins:
        return False
    scheme = environ.get("wsgi.url_scheme", "http")
    forwarded = environ.get("HTTP_X_FORWARDED_PROTO", "").lower()
    if forwarded in ("http", "https") and is_trusted_peer(
        environ.get("REMOTE_ADDR", ""), cfg.trusted_proxies
    ):
        scheme = forwarded
    return found != web_origin(f"{scheme}://{environ.get('HTTP_HOST', '')}")


_CROSS_SITE_BODY = _json_bytes(
    {
        "ok": False,
        "error": "Cross-site requests are not accepted here",
        "code": "cross_site",
    }
)


class CloudChatApp:
    """The WSGI application: request id, security headers and one log line per request."""

    def __init__(self, services: Services, router: bottle.Bottle) -> None:
        self.services = services
        self.router = router
        origins = [web_origin(services.cfg.frontend_base_url), *services.cfg.allowed_origins]
        self.site_origins = frozenset(o for o in origins if o)

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        started = time.perf_counter()
        rid = _request_id_from(environ.get("HTTP_X_REQUEST_ID", ""))
        environ["cloudchat.request_id"] = rid
        path = environ.get("PATH_INFO", "")
        secure_headers = path.startswith("/auth/")
        private = path in _PRIVATE_PATHS  # a visitor's own conversation, error or not
        seen: list[str] = []

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            if secure_headers:
                headers = [h for h in headers if h[0].lower() not in _SECURITY_HEADER_NAMES]
                headers.extend(SECURITY_HEADERS)
            else:
                headers.append(NOSNIFF)
                if private and not any(k.lower() == "cache-control" for k, _ in headers):
                    headers.append(("Cache-Control", "no-store"))
            content_type = next((v for k, v in headers if k.lower() == "content-type"), "")
            if content_type.startswith(_DATA_TYPES):
                headers.append(DATA_CSP)
            headers.append(("X-Request-ID", rid))
            seen.append(status)
            return start_response(status, headers, exc_info)

        if cross_site_refusal(environ, self.services.cfg, self.site_origins):
            # Before any route runs: a page on another site cannot make a logged-in browser
            # change anything here (SameSite=Lax does not cover a same-site origin).
            start(
                "403 Forbidden",
                [
                    ("Content-Type", "application/json"),
                    ("Content-Length", str(len(_CROSS_SITE_BODY))),
                ],
            )
            self._log(environ, path, seen, started, rid)
            return [_CROSS_SITE_BODY]
        body = self.router(environ, start)
        if isinstance(body, list):
            self._log(environ, path, seen, started, rid)
            return body
        return _LoggedBody(body, lambda: self._log(environ, path, seen, started, rid))

    @staticmethod
    def _log(
        environ: Mapping[str, Any], path: str, seen: list[str], started: float, rid: str
    ) -> None:
        status = seen[-1].split(" ", 1)[0] if seen else "-"
        elapsed = time.perf_counter() - started
        route = environ.get("bottle.route")
        metrics.observe_request(route.rule if route is not None else "other", status, elapsed)
        method = _escape(environ.get("REQUEST_METHOD", "-"))
        # PEP 3333 hands the path over as Latin-1: read it as the UTF-8 it was sent as.
        shown_path = _escape(path.encode("latin-1", "replace").decode("utf-8", "replace"))
        code = int(status) if status.isdigit() else None
        fields = {"request_id": rid, "method": method, "path": shown_path, "status": code}
        fields["ms"] = round(elapsed * 1000, 1)
        log.info(
            "%s %s %s %.1fms rid=%s",
            method,
            shown_path,
            status,
            elapsed * 1000,
            rid,
            extra={"request": fields},
        )

    def close(self) -> None:
        """Release the stores' connections."""
        self.services.close()


class _LoggedBody:
    """A streamed response body that writes the request's log line when it is closed."""

    def __init__(self, body: Any, on_close: Callable[[], None]) -> None:
        self._body = body
        self._on_close = on_close

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._body)

    def close(self) -> None:
        try:
            if hasattr(self._body, "close"):
                self._body.close()
        finally:
            self._on_close()


def _set_auth_cookie(cfg: Config, value: str, max_age: int) -> None:
    """Set (or, with max_age 0, expire) the login cookie."""
    set_cookie(cfg, cfg.auth_cookie_name, value, max_age)


def set_cookie(cfg: Config, name: str, value: str, max_age: int | None) -> None:
    """Set a cookie with the contract's attributes; max_age None: until the browser closes."""
    # Written by hand: Bottle lower-cases SameSite, and the contract spells it "Lax".
    parts = [f"{name}={value}", "HttpOnly"]
    if max_age is not None:
        parts.append(f"Max-Age={max_age}")
    parts += ["Path=/", "SameSite=Lax"]
    if max_age == 0:
        parts.append("Expires=Thu, 01 Jan 1970 00:00:00 GMT")
    if cfg.cookie_secure:
        parts.append("Secure")
    bottle.response.add_header("Set-Cookie", "; ".join(parts))


def read_cookie(name: str) -> str | None:
    """A cookie of the request, read leniently: one malformed pair spoils nothing else."""
    # http.cookies (behind bottle.request.get_cookie) raises on a header such as
    # "a@b=1; ===", which browsers send and tolerate; our values are plain tokens.
    for pair in bottle.request.environ.get("HTTP_COOKIE", "").split(";"):
        key, sep, value = pair.partition("=")
        if sep and key.strip() == name:
            return value.strip().strip('"')
    return None


def auth_token(cfg: Config) -> str | None:
    """The session id the request's login cookie carries, if it is plausibly one."""
    token = read_cookie(cfg.auth_cookie_name)
    return token if token and len(token) <= 128 else None


def current_user(s: Services) -> User | None:
    """The active user of the request's session, or None."""
    token = auth_token(s.cfg)
    return get_session_user(s.sql, s.kv, s.cfg, token) if token else None


def rate_limited(retry_after: int) -> ApiError:
    """The 429 answer to an attempt over a rate limit."""
    return ApiError(
        429, "rate_limited", "Too many attempts, try again later", {"Retry-After": str(retry_after)}
    )


def enforce_rate_limits(kv: KeyValueStore, checks: Sequence[LimitCheck]) -> None:
    """Count an attempt against every check; 429 with Retry-After when over any."""
    retry_after = over_rate_limits(kv, checks)
    if retry_after is not None:
        raise rate_limited(retry_after)


def parse_identifier(identifier: str) -> tuple[str | None, str | None]:
    """(email, phone) named by a login identifier; both None if it is neither."""
    if "@" in identifier:
        return lookup_email(identifier), None
    return None, normalize_phone(identifier)


def client_address_key(cfg: Config) -> str:
    """The request's client address as rate limits count it (IPv6 by its network)."""
    return address_key(
        client_ip(bottle.request.environ, cfg.trusted_proxies), cfg.ipv6_prefix_length
    )


DEVICE_COOKIE_NAME = "cc_device"
DEVICE_COOKIE_SECONDS = 180 * 86400


def over_login_limits(s: Services, account_id: int | None, device: str | None = None) -> int | None:
    """Count a password attempt against the login limits: the client's address, and the
    account (email and phone alike), or, for a browser holding a device cookie of that
    account, that browser alone, so that other addresses' failures cannot lock it out.

    An unknown account has no counter: its answer is the same 401 whatever the count, and
    a counter per name tried would let anyone fill Redis with them.
    """
    rule = s.cfg.rate_login_identifier
    checks: list[LimitCheck] = [
        LimitCheck(s.cfg.rate_login_ip, "login_ip", client_address_key(s.cfg))
    ]
    if device:
        checks.append(LimitCheck(rule, "login_device", device))
    elif account_id is not None:
        checks.append(LimitCheck(rule, "login_id", f"user:{account_id}"))
    return over_rate_limits(s.kv, checks)


INVALID_CREDENTIALS = ("invalid_credentials", "Invalid credentials")


def request_visitor_id(s: Services) -> str | None:
    """The request's visitor id, if this server issued it (and it is not too old)."""
    raw = read_cookie(s.cfg.app_session_cookie_name) or ""
    return raw if visitor_id_is_valid(s.secret, raw, s.cfg.session_ttl) else None


# -- the audit log -------------------------------------------------------------------------

# Who did it, from where: (client address, user agent, request id). The command line's.
Origin = tuple[str, str, str]


def request_origin(cfg: Config) -> Origin:
    """The request's client address, user agent and request id, as the audit log keeps them."""
    environ = bottle.request.environ
    return (
        client_ip(environ, cfg.trusted_proxies),
        printable_text(environ.get("HTTP_USER_AGENT", ""), USER_AGENT_MAX),
        _request_id(),
    )


def record_event(
    sql: SqlStore, event: str, user_id: int | None, origin: Origin, **detail: Any
) -> None:
    """Append an event to the audit log; a database that fails here costs a log line, not
    the request (whose own SQL already went through). Never a password, token or cookie."""
    text = " ".join(f"{name}={value}" for name, value in detail.items())
    try:
        insert_auth_event(sql, event, user_id, text, *origin)
    except ReferenceGone:
        log.info("audit event %s not recorded: the account was deleted meanwhile", event)
    except StoreUnavailable as exc:
        log.error("audit event %s not recorded: %s", event, exc)


def audit(s: Services, event: str, user_id: int | None, **detail: Any) -> None:
    """Record an event of the request being served (and count it for /metrics)."""
    metrics.count("cloudchat_auth_events_total", event=event)
    record_event(s.sql, event, user_id, request_origin(s.cfg), **detail)


def audit_limited_login(s: Services, account_id: int | None, retry_after: int) -> None:
    """Record a login refused by a rate limit once per address, account and window: a
    flood of refused attempts must not become a flood of rows."""
    origin = request_origin(s.cfg)
    marker = token_hash(f"{client_address_key(s.cfg)}|{account_id}")[:32]
    try:
        first = s.kv.set(f"audit:login_limited:{marker}", "1", retry_after, only_if_absent=True)
    except StoreUnavailable as exc:
        log.error("refused login not recorded: %s", exc)
        return
    if first:
        record_event(s.sql, "login_limited", account_id, origin)


# -- accounts: what the handlers and the command line share -------------------------------

# The rate-limit counters keyed by an account (its id), which its deletion removes.
ACCOUNT_LIMIT_ACTIONS = (
    "login_id",
    "forgot_id",
    "resend_id",
    "email_change_id",
    "account",
    "profile",
    "chat_visitor",  # a signed-in visitor's chats count on the account
)


def account_limit_keys(user: User) -> list[str]:
    """The key-value keys of the rate limits that count this account's attempts."""
    return [
        *rate_limit_keys(ACCOUNT_LIMIT_ACTIONS, f"user:{user.id}"),
        *rate_limit_keys(("register_email",), user.email),
    ]


def delete_account(
    sql: SqlStore, kv: KeyValueStore, cfg: Config, user: User, origin: Origin, by: str
) -> bool:
    """Remove an account and everything tied to it: its rows in one transaction (leaving
    the account_deleted event), then its keys (sessions cache, chat history, limits);
    False if it was gone already."""
    hashes = delete_user(sql, user.id, (f"by={by}", *origin))
    if hashes is None:
        return False
    mark_cached_sessions_revoked(kv, cfg, hashes)
    owner = history_owner(user, None)
    assert owner is not None
    today = utcnow()
    budgets = [
        budget_key(utc_day(day), "owner", owner) for day in (today, today - dt.timedelta(days=1))
    ]
    try:
        kv.delete(history_key(owner), *account_limit_keys(user), *budgets)
    except StoreUnavailable as exc:
        log.error("deleted account's history and counters left to expire: %s", exc)
    return True


def session_record(row: Sequence[Any]) -> dict[str, Any]:
    """A session row (list_user_sessions) as the API shows it: the public id, never the
    cookie or its hash."""
    id_hash, agent, ip, created, seen, expires = row
    return {
        "id": session_public_id(id_hash),
        "created_at": _iso(created),
        "last_seen_at": _iso(seen or created),
        "expires_at": _iso(expires),
        "user_agent": agent or "",
        "ip": ip or "",
    }


EVENT_FIELDS = ("at", "user_id", "event", "detail", "ip", "user_agent", "request_id")


def event_record(row: Sequence[Any]) -> dict[str, Any]:
    """An audit row (list_auth_events) as exports and `audit --json` show it."""
    record = dict(zip(EVENT_FIELDS, row, strict=True))
    record["at"] = _iso(record["at"])
    for name in ("detail", "ip", "user_agent", "request_id"):
        record[name] = record[name] or ""
    return record


def export_account(
    sql: SqlStore, kv: KeyValueStore, user: User, events_max: int = 1_000_000
) -> dict[str, Any]:
    """Everything stored about an account: profile, sessions, address links still out (not
    their tokens), audit events (the newest `events_max`), chat history, usage."""
    profile = get_user_record(sql, user.id) or {}
    for name in ("created_at", "email_verified_at"):
        profile[name] = _iso(profile.get(name))
    profile["mfa_enabled"] = user.mfa_enabled
    profile["recovery_codes_left"] = count_recovery_codes(sql, user.id)
    sessions = [
        {**session_record(row[:6]), "revoked_at": _iso(row[6])}
        for row in list_all_user_sessions(sql, user.id)
    ]
    links = [
        {"purpose": purpose, "email": email, "created_at": _iso(created), "expires_at": _iso(ends)}
        for purpose, email, created, ends in list_email_tokens(sql, user.id)
    ]
    since = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    events = [
        {name: value for name, value in event_record(row).items() if name != "user_id"}
        for row in list_auth_events(sql, user.id, since, events_max + 1)
    ]
    owner = history_owner(user, None)
    assert owner is not None
    return {
        "exported_at": _iso(utcnow()),
        "profile": profile,
        "sessions": sessions,
        "email_links": links,
        "events": events[-events_max:],
        "events_truncated": len(events) > events_max,
        "chat_history": read_history(kv, owner),
        "usage": [
            {
                "day": str(day),
                "provider": provider,
                "model": model,
                "requests": int(requests),
                "prompt_tokens": int(prompt),
                "completion_tokens": int(completion),
                "estimated": int(estimated),
            }
            for day, provider, model, requests, prompt, completion, estimated in list_user_usage(
                sql, user.id
            )
        ],
    }


# An export over HTTP holds at most this many audit events (the newest) in memory; the
# rate limits keep an account well below it within AUDIT_RETENTION_DAYS, and the operator's
# `export-user` has no such bound.
EXPORT_EVENTS_MAX = 10_000


def _iso(value: Any) -> str | None:
    """A stored time as ISO 8601 UTC, or None."""
    if value is None:
        return None
    return as_datetime(value).astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def run_cleanup(sql: SqlStore, cfg: Config) -> dict[str, int] | None:
    """One run of the cleanup job, logged; rows deleted per table, None if another process
    was at it."""
    deleted = delete_expired_rows(
        sql,
        dt.timedelta(seconds=cfg.session_idle_seconds),
        dt.timedelta(days=cfg.audit_retention_days),
    )
    if deleted is None:
        log.info("cleanup: another process is at it, skipped")
    else:
        log.info("cleanup: deleted %s", ", ".join(f"{n} {t}" for t, n in deleted.items()))
    return deleted


def cleanup_forever(sql: SqlStore, cfg: Config) -> None:
    """The server's cleanup job: every CLEANUP_INTERVAL_SECONDS (the first run a random part
    of one after the start, so that instances started together spread out)."""
    gevent.sleep(random.uniform(0.1, 1.0) * cfg.cleanup_interval)
    while True:
        try:
            run_cleanup(sql, cfg)
        except StoreUnavailable as exc:
            outage_log.warning("cleanup failed, next try in one interval", exc)
        except Exception:
            # Anything else (a table missing, say) must not end the job for good.
            log.exception("cleanup failed, next try in one interval")
        gevent.sleep(cfg.cleanup_interval)


def read_link_request(s: Services, address_action: str, what: str) -> tuple[str | None, str | None]:
    """The email or phone a forgot or resend request names; (None, None) when it names
    neither or its address is over RATE_FORGOT_IP (then nothing is sent, and the answer
    is the same 200). A 400 without an identifier."""
    cfg = s.cfg
    body = read_json_object(cfg.max_body_bytes, cfg.body_timeout)
    identifier = (str_field(body, "identifier") or str_field(body, "email") or "").strip()
    if not identifier:
        raise ApiError(400, "invalid_input", "Identifier is required")
    address = LimitCheck(cfg.rate_forgot_ip, address_action, client_address_key(cfg))
    if over_rate_limits(s.kv, [address]) is not None:
        log.info("%s: over the rate limit, nothing sent", what)
        return None, None
    return parse_identifier(identifier)


def account_for_mailed_link(
    s: Services,
    identifier: tuple[str | None, str | None],
    action: str,
    what: str,
    unverified_only: bool = False,
) -> User | None:
    """The active account an (email, phone) names (with an unverified address, if asked),
    if it may get one more mailed link (its RATE_FORGOT_IDENTIFIER, email and phone alike,
    counted as `action`); else None, logged as `what`.

    Counted only for an account that exists: a counter per unknown address named would let
    anyone fill Redis, and the answer (always 200) is the same either way.
    """
    found = get_password_login(s.sql, *identifier)
    kind = "unverified active" if unverified_only else "active"
    if found is None or not found[0].is_active or (unverified_only and found[0].email_verified):
        log.info("%s: no %s account for the identifier, nothing sent", what, kind)
        return None
    user = found[0]
    account = LimitCheck(s.cfg.rate_forgot_identifier, action, f"user:{user.id}")
    if over_rate_limits(s.kv, [account]) is not None:
        log.info("%s: over the rate limit of the account, nothing sent", what)
        return None
    return user


def issue_password_reset(
    s: Services, email: str | None, phone: str | None, origin: Origin
) -> str | None:
    """Store a reset token for the account and mail its link, within the account's limit
    (email and phone alike); the token, or None."""
    user = account_for_mailed_link(s, (email, phone), "forgot_id", "password reset")
    if user is None:
        return None
    token = new_token()
    expires_at = utcnow() + dt.timedelta(seconds=s.cfg.pwreset_token_ttl)
    replace_reset_token(s.sql, user.id, token_hash(token), expires_at)
    s.mailer.send(reset_mail(s.cfg, user.email, token))
    record_event(s.sql, "reset_link_sent", user.id, origin)
    return token


# -- two-factor sign-in: what login and the step-up checks share ----------------------------

MFA_COOKIE_NAME = "cc_mfa"
MFA_LOGIN_SECONDS = 300  # from the right password to the code
MFA_WRONG_CODES_MAX = 5  # per cc_mfa cookie; then the password again
MFA_REQUIRED = ("mfa_required", "Enter the code from your authenticator app")
INVALID_CODE = ("invalid_code", "Invalid code")


def _mfa_login_key(token: str) -> str:
    return f"mfa_login:{token_hash(token)}"


def read_second_factor(body: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """The body's "code" and "recovery_code" (blank: none)."""
    code = (str_field(body, "code") or "").strip() or None
    recovery = (str_field(body, "recovery_code") or "").strip() or None
    return code, recovery


def mfa_is_on(s: Services, user_id: int) -> bool:
    """Whether the account has a confirmed authenticator, from SQL (not a cached session)."""
    totp = get_totp(s.sql, user_id)
    return totp is not None and totp.confirmed


def check_second_factor(
    s: Services, user: User, code: str | None, recovery: str | None, action: str
) -> str | None:
    """Use a current code (one not used before) or a recovery code of the account: which
    one worked ("totp", "recovery_code"), or None (audited as mfa_code_failed)."""
    if recovery:
        code_hash = recovery_code_hash(recovery)
        if code_hash is not None and use_recovery_code(s.sql, user.id, code_hash):
            left = count_recovery_codes(s.sql, user.id)
            audit(s, "mfa_recovery_code_used", user.id, action=action, left=left)
            return "recovery_code"
    elif code:
        totp = get_totp(s.sql, user.id)
        if totp is not None and totp.confirmed:
            step = matching_totp_step(totp.secret, code, time.time(), totp.last_step)
            # The claim is the replay guard: of two requests with one code, one wins.
            if step is not None and claim_totp_step(s.sql, user.id, step):
                return "totp"
    audit(s, "mfa_code_failed", user.id, action=action)
    return None


def confirm_identity(
    s: Services,
    user: User,
    password: str,
    body: Mapping[str, Any],
    action: str,
    second_factor: bool = True,
) -> None:
    """The signed-in user's password again before a change to the account, and, when two-
    factor sign-in is on, a current code or a recovery code beside it ("code",
    "recovery_code"): 401 invalid_credentials for a wrong password, then 401 mfa_required
    without a code, 401 invalid_code for a wrong one.

    A wrong password or code is a guess: it counts like a login attempt, on this session's
    own key (as a device's): failures of others who try to log in to the account must not
    stop its owner, signed in, from managing it.
    """
    cfg = s.cfg
    checks: list[LimitCheck] = [
        LimitCheck(cfg.rate_login_ip, "login_ip", client_address_key(cfg)),
        LimitCheck(cfg.rate_login_identifier, "change_session", token_hash(auth_token(cfg) or "")),
    ]
    if over_rate_limits(s.kv, checks) is not None:
        s.hasher.spend_one_verification(password)
        raise ApiError(401, *INVALID_CREDENTIALS)
    password_hash = get_password_hash(s.sql, user.id)
    if password_hash is None:  # deleted a moment ago, by another request
        s.hasher.spend_one_verification(password)
        raise ApiError(401, "unauthorized", "Unauthorized")
    if not s.hasher.verify(password_hash, password):
        audit(s, "password_check_failed", user.id, action=action)
        raise ApiError(401, *INVALID_CREDENTIALS)
    if not second_factor or not mfa_is_on(s, user.id):
        return
    code, recovery = read_second_factor(body)
    if not code and not recovery:
        raise ApiError(401, *MFA_REQUIRED)
    if check_second_factor(s, user, code, recovery, action) is None:
        raise ApiError(401, *INVALID_CODE)


def finish_login(s: Services, user: User, device: str | None, second_factor: str = "") -> None:
    """A new session for a user who proved who they are: the login cookies, the audit row."""
    cfg = s.cfg
    previous = auth_token(cfg)
    if previous:
        # Never keep a session id from before the login (fixation): end it.
        revoke_session(s.sql, s.kv, cfg, previous)
    user_agent = bottle.request.environ.get("HTTP_USER_AGENT", "")
    ip = client_ip(bottle.request.environ, cfg.trusted_proxies)
    token = create_session(s.sql, s.kv, cfg, user, user_agent, ip)
    detail = {"second_factor": second_factor} if second_factor else {}
    audit(s, "login_ok", user.id, session=session_public_id(token_hash(token)), **detail)
    _set_auth_cookie(cfg, token, cfg.session_ttl)
    if device is None:
        cookie = new_device_cookie(s.secret, user.id)
        set_cookie(cfg, DEVICE_COOKIE_NAME, cookie, DEVICE_COOKIE_SECONDS)
    # The account's history from now on; the next person on this browser starts afresh.
    set_cookie(cfg, cfg.app_session_cookie_name, "", 0)


def start_mfa_login(s: Services, user: User) -> None:
    """The right password of an account with two-factor sign-in: a cc_mfa cookie for this
    attempt alone (no session yet), good for MFA_LOGIN_SECONDS."""
    token = new_token()
    s.kv.set(_mfa_login_key(token), str(user.id), MFA_LOGIN_SECONDS)
    set_cookie(s.cfg, MFA_COOKIE_NAME, token, MFA_LOGIN_SECONDS)
    audit(s, "login_mfa_pending", user.id)


def read_display_name(value: Any) -> str | None:
    """A display name from a body field (blank or null: none); a 400 if unfit."""
    name = (str_field({"display_name": value}, "display_name") or "").strip()
    if name and (len(name) > DISPLAY_NAME_MAX or not name.isprintable()):
        raise ApiError(
            400, "invalid_input", f"Display name must be at most {DISPLAY_NAME_MAX} characters"
        )
    return name or None


def read_phone(value: Any) -> str | None:
    """A normalised phone number from a body field (blank or null: none); a 400 if unfit."""
    raw = (str_field({"phone": value}, "phone") or "").strip()
    phone = normalize_phone(raw) if raw else None
    if raw and phone is None:
        raise ApiError(400, "invalid_phone", "Phone must be digits with an optional leading +")
    return phone


def issue_email_verification(s: Services, user: User, origin: Origin, welcome: bool = False) -> str:
    """Store a verification token for the account's present address and mail its link."""
    token = new_token()
    expires_at = utcnow() + dt.timedelta(seconds=s.cfg.email_token_ttl)
    replace_email_token(s.sql, user.id, "verify", user.email, token_hash(token), expires_at)
    s.mailer.send(verify_mail(s.cfg, user.email, token, welcome))
    record_event(s.sql, "verification_sent", user.id, origin)
    return token


def resend_verification(
    s: Services, email: str | None, phone: str | None, origin: Origin
) -> str | None:
    """A new verification link for an active, unverified account, within the account's
    limit (email and phone alike); the token, or None."""
    found = account_for_mailed_link(s, (email, phone), "resend_id", "verification", True)
    return issue_email_verification(s, found, origin) if found is not None else None


# -- handlers: addresses and the account itself --------------------------------------------


def verify_email(s: Services) -> dict[str, Any]:
    """POST /auth/email/verify {"token"}: confirm an address with its mailed link, once; a
    change-of-address link makes the new address the account's."""
    cfg = s.cfg
    body = read_json_object(cfg.max_body_bytes, cfg.body_timeout)
    token = (str_field(body, "token") or "").strip()
    enforce_rate_limits(s.kv, [LimitCheck(cfg.rate_token_ip, "token_ip", client_address_key(cfg))])
    invalid = ApiError(400, "invalid_token", "Token invalid or expired")
    if not token or len(token) > 128:
        raise invalid
    try:
        used = use_email_token(s.sql, token_hash(token))
    except DuplicateError:
        raise ApiError(409, "email_taken", "Email already registered") from None
    if used is None:
        raise invalid
    user_id, purpose, address = used
    if purpose == "change":
        # Every other device's session ends with the old address (a thief's too); this
        # browser's stays if it is the account's own.
        current = current_user(s)
        keep = auth_token(cfg) if current is not None and current.id == user_id else None
        revoked = revoke_user_sessions(s.sql, s.kv, cfg, user_id, keep_token=keep)
        audit(s, "email_changed", user_id, to=mask_email(address), revoked_sessions=revoked)
    else:
        audit(s, "email_verified", user_id)
    refresh_cached_sessions(s.sql, s.kv, cfg, user_id)
    return {"ok": True}


def resend_verification_link(s: Services) -> dict[str, Any]:
    """POST /auth/email/resend {"identifier"}: always 200; a new link when the account
    exists and is unverified."""
    email, phone = read_link_request(s, "resend_ip", "verification")
    if email or phone:
        # Looked up after the answer is sent: its timing cannot tell whether the account
        # exists or is verified.
        s.jobs.spawn(resend_verification, s, email, phone, request_origin(s.cfg))
    return {"ok": True}


def change_email(s: Services, user: User) -> dict[str, Any]:
    """POST /auth/email/change {"password", "new_email"}: a link to the new address (which
    becomes the account's when it is used), a notice to the old one."""
    cfg = s.cfg
    body = read_json_object(cfg.max_body_bytes, cfg.body_timeout)
    password = str_field(body, "password") or ""
    raw = str_field(body, "new_email")
    if not password or not raw:
        raise ApiError(400, "invalid_input", "password and new_email are required")
    new_email = normalize_email(raw)
    if new_email is None:
        raise ApiError(400, "invalid_email", "A valid email address is required")
    if new_email == user.email.lower():
        raise ApiError(400, "invalid_input", "That is the account's address already")
    confirm_identity(s, user, password, body, "email_change")
    # Each change mails an address the caller chose: limited like reset links, so that the
    # server cannot be made to mail anyone at will.
    account = LimitCheck(cfg.rate_forgot_identifier, "email_change_id", f"user:{user.id}")
    enforce_rate_limits(s.kv, [account])
    if get_user_by_email(s.sql, new_email) is not None:
        raise ApiError(409, "email_taken", "Email already registered")
    token = new_token()
    expires_at = utcnow() + dt.timedelta(seconds=cfg.email_token_ttl)
    replace_email_token(s.sql, user.id, "change", new_email, token_hash(token), expires_at)
    s.mailer.send(email_change_mail(cfg, new_email, token))
    s.mailer.send(email_change_notice_mail(cfg, user.email, new_email))
    audit(s, "email_change_requested", user.id, to=mask_email(new_email))
    return {"ok": True}


PROFILE_FIELDS = frozenset(("display_name", "phone"))


def update_me(s: Services, user: User) -> dict[str, Any]:
    """PATCH /auth/me {"display_name"?, "phone"?}: the caller's profile; null or "" clears
    a field; 409 for a phone number another account has."""
    count_account_action(s, user)
    body = read_json_object(s.cfg.max_body_bytes, s.cfg.body_timeout)
    # Each change is a row in the audit log: a tighter limit than RATE_ACCOUNT's, so that
    # no account can grow the table by a row a second for AUDIT_RETENTION_DAYS.
    enforce_rate_limits(s.kv, [LimitCheck(s.cfg.rate_profile, "profile", f"user:{user.id}")])
    if not body or not body.keys() <= PROFILE_FIELDS:
        raise ApiError(400, "invalid_input", "Send display_name and/or phone, nothing else")
    display_name = read_display_name(body["display_name"]) if "display_name" in body else None
    phone = read_phone(body["phone"]) if "phone" in body else None
    try:
        update_profile(
            s.sql,
            user.id,
            display_name if "display_name" in body else user.display_name,
            phone if "phone" in body else user.phone,
        )
    except DuplicateError:
        raise ApiError(409, "phone_taken", "Phone number already registered") from None
    refresh_cached_sessions(s.sql, s.kv, s.cfg, user.id)
    audit(s, "profile_updated", user.id, fields=",".join(sorted(body)))
    fresh = get_user_by_id(s.sql, user.id)
    if fresh is None:  # deleted in between
        raise ApiError(401, "unauthorized", "Unauthorized")
    return {"ok": True, "user": fresh.public()}


def delete_me(s: Services, user: User) -> dict[str, Any]:
    """DELETE /auth/me {"password"}: the account and everything tied to it are gone."""
    cfg = s.cfg
    body = read_json_object(cfg.max_body_bytes, cfg.body_timeout)
    password = str_field(body, "password") or ""
    if not password:
        raise ApiError(400, "invalid_input", "password is required")
    confirm_identity(s, user, password, body, "delete_account")
    if not delete_account(s.sql, s.kv, cfg, user, request_origin(cfg), by="self"):
        raise ApiError(401, "unauthorized", "Unauthorized")  # deleted by a request before
    s.mailer.send(account_deleted_mail(cfg, user.email))
    expire_login_cookies(cfg)
    set_cookie(cfg, DEVICE_COOKIE_NAME, "", 0)
    return {"ok": True}


def export_me(s: Services, user: User) -> dict[str, Any]:
    """GET /auth/me/export: everything stored about the caller, as a JSON download."""
    count_account_action(s, user)
    bottle.response.set_header(
        "Content-Disposition", 'attachment; filename="cloudchat-export.json"'
    )
    return {"ok": True, **export_account(s.sql, s.kv, user, EXPORT_EVENTS_MAX)}


# -- handlers: two-factor sign-in ----------------------------------------------------------


def mfa_setup(s: Services, user: User) -> dict[str, Any]:
    """POST /auth/mfa/totp/setup {"password"}: a fresh secret, pending until confirmed (a
    pending one is replaced; a confirmed one needs disable first: 409)."""
    cfg = s.cfg
    body = read_json_object(cfg.max_body_bytes, cfg.body_timeout)
    password = str_field(body, "password") or ""
    if not password:
        raise ApiError(400, "invalid_input", "password is required")
    confirm_identity(s, user, password, body, "mfa_setup", second_factor=False)
    secret = new_totp_secret()
    try:
        pending = set_pending_totp(s.sql, user.id, secret)
    except DuplicateError:
        raise ApiError(409, "mfa_setup_busy", "Another setup is under way, try again") from None
    if not pending:
        raise ApiError(409, "mfa_enabled", "Two-factor sign-in is on already: disable it first")
    audit(s, "mfa_setup_started", user.id)
    return {
        "ok": True,
        "secret": secret,
        "otpauth_uri": otpauth_uri(cfg.site_name, user.email, secret),
    }


def mfa_confirm(s: Services, user: User) -> dict[str, Any]:
    """POST /auth/mfa/totp/confirm {"code"}: a code of the pending secret switches
    two-factor sign-in on; the answer holds the recovery codes, shown this once."""
    count_account_action(s, user)
    body = read_json_object(s.cfg.max_body_bytes, s.cfg.body_timeout)
    code = (str_field(body, "code") or "").strip()
    if not code:
        raise ApiError(400, "invalid_input", "code is required")
    totp = get_totp(s.sql, user.id)
    if totp is None or totp.confirmed:
        raise ApiError(409, "no_mfa_setup", "Nothing to confirm: start with the setup")
    step = matching_totp_step(totp.secret, code, time.time(), None)
    if step is None:
        audit(s, "mfa_code_failed", user.id, action="mfa_confirm")
        raise ApiError(400, *INVALID_CODE)
    codes = [new_recovery_code() for _ in range(RECOVERY_CODES)]
    hashes = [recovery_code_hash(c) or "" for c in codes]
    if not confirm_totp(s.sql, user.id, totp.secret, step, hashes):
        raise ApiError(409, "no_mfa_setup", "The setup changed meanwhile: start again")
    refresh_cached_sessions(s.sql, s.kv, s.cfg, user.id)
    audit(s, "mfa_enabled", user.id)
    s.mailer.send(mfa_changed_mail(s.cfg, user.email, enabled=True))
    return {"ok": True, "recovery_codes": codes}


def mfa_disable(s: Services, user: User) -> dict[str, Any]:
    """POST /auth/mfa/totp/disable {"password", "code"} (or "recovery_code"): two-factor
    sign-in off, the secret and the recovery codes gone."""
    cfg = s.cfg
    body = read_json_object(cfg.max_body_bytes, cfg.body_timeout)
    password = str_field(body, "password") or ""
    if not password:
        raise ApiError(400, "invalid_input", "password is required")
    confirm_identity(s, user, password, body, "mfa_disable")
    if not delete_totp(s.sql, user.id):
        raise ApiError(409, "mfa_not_enabled", "Two-factor sign-in is not on")
    refresh_cached_sessions(s.sql, s.kv, cfg, user.id)
    audit(s, "mfa_disabled", user.id)
    s.mailer.send(mfa_changed_mail(cfg, user.email, enabled=False))
    return {"ok": True}


# -- handlers: accounts ------------------------------------------------------------------


def register(s: Services) -> dict[str, Any]:
    """POST /auth/register: a new account; 201."""
    cfg = s.cfg
    body = read_json_object(cfg.max_body_bytes, cfg.body_timeout)
    email = normalize_email(str_field(body, "email"))
    password = str_field(body, "password")
    if email is None:
        raise ApiError(400, "invalid_email", "A valid email address is required")
    problem = s.passwords.problem(password or "", email)
    if problem:
        raise ApiError(400, "weak_password", problem)
    phone = read_phone(body.get("phone"))
    display_name = read_display_name(body.get("display_name"))
    enforce_rate_limits(
        s.kv,
        [
            LimitCheck(cfg.rate_register_ip, "register_ip", client_address_key(cfg)),
            LimitCheck(cfg.rate_register_email, "register_email", email),
        ],
    )
    password_hash = s.hasher.hash(password)
    try:
        user_id = insert_user(s.sql, email, phone, display_name, password_hash)
    except DuplicateError as exc:
        # The constraints decide uniqueness: a check-then-insert would race.
        if "phone" in exc.constraint:
            raise ApiError(409, "phone_taken", "Phone number already registered") from None
        raise ApiError(409, "email_taken", "Email already registered") from None
    audit(s, "register", user_id)
    user = get_user_by_id(s.sql, user_id) if cfg.email_verification != "off" else None
    if user is not None:
        issue_email_verification(s, user, request_origin(cfg), welcome=True)
    else:
        s.mailer.send(welcome_mail(cfg, email))
    bottle.response.status = 201
    return {"ok": True}


def login(s: Services) -> dict[str, Any]:
    """POST /auth/login: a new session for the right password; the uniform 401 otherwise."""
    cfg = s.cfg
    body = read_json_object(cfg.max_body_bytes, cfg.body_timeout)
    identifier = (str_field(body, "identifier") or "").strip()
    password = str_field(body, "password") or ""
    if not identifier or not password:
        raise ApiError(400, "invalid_input", "Identifier and password are required")
    email, phone = parse_identifier(identifier)
    # The account is looked up first, so that its limit counts the account (email and
    # phone alike); every path below costs one password check, so neither the answer
    # nor its timing tells an unknown account, a wrong password or a limit apart.
    found = get_password_login(s.sql, email, phone) if (email or phone) else None
    account_id = found[0].id if found else None
    device = (
        device_nonce(s.secret, read_cookie(DEVICE_COOKIE_NAME), account_id)
        if account_id is not None
        else None
    )
    retry_after = over_login_limits(s, account_id, device)
    if retry_after is not None or found is None:
        s.hasher.spend_one_verification(password)
        if retry_after is not None:
            audit_limited_login(s, account_id, retry_after)
        else:
            audit(s, "login_failed", None, reason="unknown_account")
        raise ApiError(401, *INVALID_CREDENTIALS)
    user, password_hash = found
    if not s.hasher.verify(password_hash, password) or not user.is_active:
        audit(s, "login_failed", user.id, reason="password" if user.is_active else "inactive")
        raise ApiError(401, *INVALID_CREDENTIALS)
    if cfg.email_verification == "required" and not user.email_verified:
        # After the password check: without the password, nothing tells this apart.
        audit(s, "login_failed", user.id, reason="email_not_verified")
        raise ApiError(
            403, "email_not_verified", "Confirm your email address first, with the link we sent"
        )
    if s.hasher.needs_rehash(password_hash):
        update_password_hash(s.sql, user.id, s.hasher.hash(password))
    if user.mfa_enabled:
        start_mfa_login(s, user)
        raise ApiError(401, *MFA_REQUIRED)
    finish_login(s, user, device)
    return {"ok": True}


def login_mfa(s: Services) -> dict[str, Any]:
    """POST /auth/login/mfa {"code"} or {"recovery_code"}, with the cc_mfa cookie of a
    login whose password was right: the session. A wrong code counts toward the login
    limits of the account and the address; the cookie dies after MFA_WRONG_CODES_MAX."""
    cfg = s.cfg
    body = read_json_object(cfg.max_body_bytes, cfg.body_timeout)
    code, recovery = read_second_factor(body)
    if (code is None) == (recovery is None):
        raise ApiError(400, "invalid_input", "Send code or recovery_code")
    expired = ApiError(401, "mfa_expired", "Sign in again: the step for the code has ended")
    token = read_cookie(MFA_COOKIE_NAME) or ""
    if not token or len(token) > 128:
        raise expired
    key = _mfa_login_key(token)
    raw_id = s.kv.get(key) or ""
    user = get_user_by_id(s.sql, int(raw_id)) if raw_id.isdigit() else None
    if user is None or not user.is_active:
        raise expired
    device = device_nonce(s.secret, read_cookie(DEVICE_COOKIE_NAME), user.id)
    retry_after = over_login_limits(s, user.id, device)
    if retry_after is not None:
        audit_limited_login(s, user.id, retry_after)
        raise ApiError(401, *INVALID_CODE)
    method = check_second_factor(s, user, code, recovery, "login")
    if method is None:
        attempts = LimitCheck(
            RateLimit(MFA_WRONG_CODES_MAX, MFA_LOGIN_SECONDS), "mfa_codes", token_hash(token)
        )
        counts, _ = s.kv.hit_many(rate_limit_windows([attempts]))
        if counts[0][0] >= MFA_WRONG_CODES_MAX:
            s.kv.delete(key)
        raise ApiError(401, *INVALID_CODE)
    if not s.kv.delete(key):  # single use: a concurrent request finished this login first
        raise expired
    set_cookie(cfg, MFA_COOKIE_NAME, "", 0)
    finish_login(s, user, device, method)
    return {"ok": True}


def expire_login_cookies(cfg: Config) -> None:
    """A logout's cookies: the session's expires, and the visitor id with it (the next
    person on this browser starts a fresh conversation)."""
    _set_auth_cookie(cfg, "", 0)
    set_cookie(cfg, cfg.app_session_cookie_name, "", 0)


def count_account_action(s: Services, user: User) -> None:
    """Count what an account does to itself (RATE_ACCOUNT); 429 beyond."""
    enforce_rate_limits(s.kv, [LimitCheck(s.cfg.rate_account, "account", f"user:{user.id}")])


LOGOUT_SCOPES = ("local", "others", "global")


def logout(s: Services) -> dict[str, Any]:
    """POST /auth/logout {"scope"?}: this session (local, the default), every other one
    (others) or all of them (global) end; always 200 with how many ended."""
    cfg = s.cfg
    # Read, though it may be empty: a text/plain or form body (which any page may send
    # without a preflight) is a 415, not a logout.
    body = read_json_object(cfg.max_body_bytes, cfg.body_timeout)
    scope = str_field(body, "scope") or "local"
    if scope not in LOGOUT_SCOPES:
        raise ApiError(400, "invalid_input", "scope must be local, others or global")
    token = auth_token(cfg)
    user = current_user(s) if token else None
    revoked = 0
    if user is not None and scope != "local":
        keep = token if scope == "others" else None
        revoked = revoke_user_sessions(s.sql, s.kv, cfg, user.id, keep_token=keep)
    elif token and scope == "local":
        revoked = int(revoke_session(s.sql, s.kv, cfg, token))
    if user is not None:
        audit(s, "logout", user.id, scope=scope, revoked_sessions=revoked)
    if scope != "others":
        expire_login_cookies(cfg)
    return {"ok": True, "revoked_sessions": revoked}


def own_sessions(s: Services, user: User) -> list[tuple]:
    """The caller's live sessions (list_user_sessions), with the configured idle timeout."""
    return list_user_sessions(s.sql, user.id, dt.timedelta(seconds=s.cfg.session_idle_seconds))


def list_sessions(s: Services, user: User) -> dict[str, Any]:
    """GET /auth/sessions: the caller's live sessions, newest first."""
    count_account_action(s, user)
    current = token_hash(auth_token(s.cfg) or "")
    sessions = [
        {**session_record(row), "current": row[0] == current} for row in own_sessions(s, user)
    ]
    return {"ok": True, "sessions": sessions}


_PUBLIC_ID_RE = re.compile(r"[0-9a-f]{32}")


def delete_session(s: Services, user: User, session_id: str) -> dict[str, Any]:
    """DELETE /auth/sessions/<id>: end one of the caller's sessions; 404 for any other id
    (another user's looks exactly like an unknown one)."""
    count_account_action(s, user)
    if not _PUBLIC_ID_RE.fullmatch(session_id):
        raise ApiError(404, "not_found", "No such session")
    for id_hash, *_ in own_sessions(s, user):
        if hmac.compare_digest(session_public_id(id_hash), session_id):
            revoke_session_by_hash(s.sql, s.kv, s.cfg, id_hash)
            audit(s, "session_revoked", user.id, session=session_id)
            if id_hash == token_hash(auth_token(s.cfg) or ""):
                expire_login_cookies(s.cfg)  # the current session: a logout
            return {"ok": True}
    raise ApiError(404, "not_found", "No such session")


def me(s: Services, user: User) -> dict[str, Any]:
    """GET /auth/me: the signed-in user."""
    return {"ok": True, "user": user.public()}


# -- handlers: passwords -----------------------------------------------------------------


def forgot_password(s: Services) -> dict[str, Any]:
    """POST /auth/password/forgot: always 200; a reset link when the account exists."""
    cfg = s.cfg
    email, phone = read_link_request(s, "forgot_ip", "password reset")
    answer: dict[str, Any] = {"ok": True}
    if (email or phone) and cfg.debug_return_reset_token:
        token = issue_password_reset(s, email, phone, request_origin(cfg))
        if token:
            answer.update(debug_token=token, debug_ttl=cfg.pwreset_token_ttl)
    elif email or phone:
        # Looked up after the answer is sent: its timing cannot tell whether the
        # account exists.
        s.jobs.spawn(issue_password_reset, s, email, phone, request_origin(cfg))
    return answer


def reset_password(s: Services) -> dict[str, Any]:
    """POST /auth/password/reset: a new password with a mailed token, used once."""
    cfg = s.cfg
    body = read_json_object(cfg.max_body_bytes, cfg.body_timeout)
    token = (str_field(body, "token") or "").strip()
    password = str_field(body, "password") or ""
    weak = ApiError(400, "weak_password", "Invalid token or weak password")
    if s.passwords.problem(password):
        raise weak
    invalid = ApiError(400, "invalid_token", "Token invalid or expired")
    if not token or len(token) > 128:
        raise invalid
    id_hash = token_hash(token)
    # A cheap look first, so a stale token costs no Argon2 hash; the claim is atomic below.
    owner_id = get_reset_user_id(s.sql, id_hash)
    owner = get_user_by_id(s.sql, owner_id) if owner_id is not None else None
    if owner is None:
        raise invalid
    if s.passwords.problem(password, owner.email):
        raise weak
    user_id = consume_reset_token(s.sql, id_hash, s.hasher.hash(password))
    if user_id is None:
        raise invalid
    revoked = revoke_user_sessions(s.sql, s.kv, cfg, user_id) if cfg.pwreset_revoke_sessions else 0
    audit(s, "password_reset", user_id, revoked_sessions=revoked)
    user = get_user_by_id(s.sql, user_id)
    if user:
        s.mailer.send(password_changed_mail(cfg, user.email))
    return {"ok": True, "revoked_sessions": revoked}


def change_password(s: Services, user: User) -> dict[str, Any]:
    """POST /auth/password/change: the signed-in user's new password; other sessions end."""
    cfg = s.cfg
    body = read_json_object(cfg.max_body_bytes, cfg.body_timeout)
    current = str_field(body, "current_password") or ""
    new = str_field(body, "new_password") or ""
    if not current or not new:
        raise ApiError(400, "invalid_input", "current_password and new_password are required")
    problem = s.passwords.problem(new, user.email)
    if problem:
        raise ApiError(400, "weak_password", problem)
    confirm_identity(s, user, current, body, "password_change")
    update_password_hash(s.sql, user.id, s.hasher.hash(new))
    revoked = revoke_user_sessions(s.sql, s.kv, cfg, user.id, keep_token=auth_token(cfg))
    audit(s, "password_changed", user.id, revoked_sessions=revoked)
    s.mailer.send(password_changed_mail(cfg, user.email))
    return {"ok": True, "revoked_sessions": revoked}


# -- handlers: chat ----------------------------------------------------------------------


def chat(s: Services) -> Any:
    """POST /deepseek_chat: the model's answer as NDJSON lines, streamed as it is written."""
    s.chat.setup_gate.wait_turn()  # a burst of chats lets other requests through
    cfg = s.cfg
    user = current_user(s)
    if cfg.chat_require_auth and user is None:
        raise ApiError(401, "unauthorized", "Unauthorized")
    body = read_json_object(cfg.max_body_bytes, cfg.body_timeout)
    message = str_field(body, "message")
    if message is None or not message.strip():
        raise ApiError(400, "empty_message", "Message must not be empty")
    if len(message) > cfg.chat_max_chars:
        raise ApiError(400, "message_too_long", f"Message exceeds {cfg.chat_max_chars} characters")
    address = client_address_key(cfg)
    # A made-up, foreign or stale cc_app is never adopted: a new one is issued, counted
    # against the address's limit on new ids (beyond it the answer keeps no history).
    visitor = request_visitor_id(s) if user is None else None
    new_visitor = new_visitor_id(s.secret) if user is None and visitor is None else None
    owner = history_owner(user, visitor or new_visitor)
    assert owner is not None
    # The address first: past its limit, nothing further is counted or stored.
    checks: list[LimitCheck] = [
        LimitCheck(cfg.rate_chat_ip, "chat_ip", address),
        LimitCheck(cfg.rate_chat_visitor, "chat_visitor", owner),
    ]
    issuing = (
        LimitCheck(cfg.rate_visitor_ids_ip, "visitor_ids_ip", address) if new_visitor else None
    )
    retry_after, history, may_issue = count_chat_and_load_history(s.kv, cfg, checks, owner, issuing)
    if retry_after is not None:
        raise rate_limited(retry_after)
    if new_visitor and may_issue:
        set_cookie(cfg, cfg.app_session_cookie_name, new_visitor, None)
    elif new_visitor:
        log.info("chat: address over RATE_VISITOR_IDS_IP, answered without history")
        owner = None
    anonymous = (visitor or new_visitor) if user is None and owner is not None else None
    scope = ChatScope(user.id if user is not None else None, anonymous, address)
    wait = over_chat_budget(s.kv, s.sql, cfg, scope)
    if wait is not None:
        raise ApiError(
            429,
            "chat_budget_exhausted",
            "Today's chat budget is spent, please come back tomorrow",
            {"Retry-After": str(wait)},
        )
    messages = [
        {"role": "system", "content": cfg.system_prompt},
        *history,
        {"role": "user", "content": message},
    ]
    watch = HangupWatch(client_socket(bottle.request.environ) if cfg.chat_providers else None)
    try:
        stream, batches, first = s.chat.start(messages, watch)
    except VisitorLeft:
        watch.stop()
        log.info("visitor left before the first token: provider connection closed")
        # nginx's code for it; nobody reads it, the access line shows it.
        raise ApiError(499, "client_closed_request", "Client closed the request") from None
    except BaseException:
        watch.stop()
        raise
    bottle.response.content_type = "application/x-ndjson"
    bottle.response.set_header("Cache-Control", "no-store")
    bottle.response.set_header("X-Accel-Buffering", "no")  # nginx: pass lines on at once
    prompt_chars = sum(len(m["content"]) for m in messages)
    return s.chat.relay(stream, batches, first, owner, history, message, watch, scope, prompt_chars)


def chat_history(s: Services) -> dict[str, Any]:
    """GET /chat/history: the rounds the next message would carry (without the system
    prompt): the account's when logged in, else the visitor's."""
    cfg = s.cfg
    address = LimitCheck(cfg.rate_chat_ip, "history_ip", client_address_key(cfg))
    enforce_rate_limits(s.kv, [address])
    owner = history_owner(current_user(s), request_visitor_id(s))
    kept = read_history(s.kv, owner) if owner and cfg.max_history else []
    return {"ok": True, "messages": kept[-2 * cfg.max_history :]}


def chat_usage(s: Services) -> dict[str, Any]:
    """GET /chat/usage: the caller's tokens today (the account's, else the visitor's) and
    the daily limit that applies to it (null: none)."""
    cfg = s.cfg
    address = client_address_key(cfg)
    enforce_rate_limits(s.kv, [LimitCheck(cfg.rate_chat_ip, "history_ip", address)])
    user = current_user(s)
    visitor = request_visitor_id(s) if user is None else None
    scope = ChatScope(user.id if user is not None else None, visitor, address)
    day = utc_day()
    tokens = 0
    if scope.owner:
        key = budget_key(day, "owner", scope.owner)
        (tokens,) = read_budget_counters(s.kv, s.sql, day, [key])
    limit = cfg.chat_daily_tokens_user if user is not None else cfg.chat_daily_tokens_anon
    return {"ok": True, "today": {"tokens": tokens, "limit": limit or None}}


def reset_chat(s: Services) -> dict[str, Any]:
    """POST /reset_chat: forget the account's or the visitor's history."""
    owner = history_owner(current_user(s), request_visitor_id(s))
    if owner:
        clear_history(s.kv, owner)
    return {"ok": True, "status": "Reset chat history successfully"}


# -- handlers: operations ----------------------------------------------------------------


def livez(s: Services) -> dict[str, Any]:
    """GET /livez: 200 while the process serves; touches no store (the liveness probe)."""
    return {"ok": True}


def metrics_page(s: Services) -> str:
    """GET /metrics: the Prometheus text format, to a trusted peer that forwards for no
    client (a scraper on the box or the private network) or with the bearer METRICS_TOKEN;
    a 404 to anyone else, as if there were no such page."""
    environ = bottle.request.environ
    token = s.cfg.metrics_token
    offered = environ.get("HTTP_AUTHORIZATION", "")
    by_token = bool(token) and hmac.compare_digest(offered.encode(), f"Bearer {token}".encode())
    forwarding = "HTTP_X_FORWARDED_FOR" in environ or "HTTP_X_REAL_IP" in environ
    direct = not forwarding and is_trusted_peer(
        environ.get("REMOTE_ADDR", ""), s.cfg.trusted_proxies
    )
    if not (by_token or direct):
        raise ApiError(404, "not_found", "Not found")
    bottle.response.content_type = "text/plain; version=0.0.4; charset=utf-8"
    bottle.response.set_header("Cache-Control", "no-store")
    return metrics.render()


def healthz(s: Services) -> dict[str, Any]:
    """GET /auth/healthz: 200 when Redis and the database answer, else 503."""
    checks = s.health()
    ok = all(checks.values())
    bottle.response.status = 200 if ok else 503
    return {"ok": ok, **checks}


def timestamp(s: Services) -> dict[str, Any]:
    """GET /test: a timestamp and the request id (to see that nothing caches)."""
    return {"timestamp": time.time(), "request_id": _request_id()}


# -- the demo page ----------------------------------------------------------------------------

# One page that tries every part of the API in a browser: served at / and at the paths the
# mails link to (reset_password, verify_email) when DEMO_PAGE is on. Inline script and style,
# allowed by their hashes; no inline handlers, no external assets; relative URLs, so it works
# under a prefix (nginx's /cloudchat/). English and Simplified Chinese.
DEMO_PAGE_HTML = r"""<!doctype html>
<html lang="__LANG__">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<link rel="icon" href="data:,">
<title>CloudChat</title>
<style>
:root { color-scheme: light dark; --accent: #2563eb; --line: #8884; }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 60rem; padding: 1rem; font: 16px/1.5 system-ui, sans-serif; }
header {
  display: flex;
  flex-wrap: wrap;
  gap: .5rem;
  align-items: center;
  justify-content: space-between;
}
h1 { font-size: 1.4rem; margin: 0; }
h2 { font-size: 1.1rem; margin: 0 0 .5rem; }
main { display: grid; gap: 1rem; grid-template-columns: repeat(auto-fit, minmax(17rem, 1fr)); }
section {
  border: 1px solid var(--line); border-radius: .5rem; padding: .75rem; min-width: 0;
  overflow-wrap: anywhere;
}
form { display: grid; gap: .4rem; margin: 0 0 .75rem; }
label { display: grid; gap: .15rem; font-size: .9rem; }
input, textarea, select, button {
  font: inherit;
  padding: .4rem .5rem;
  border-radius: .35rem;
  border: 1px solid var(--line);
  max-width: 100%;
}
button { background: var(--accent); color: #fff; border-color: var(--accent); cursor: pointer; }
button.plain { background: transparent; color: inherit; border-color: var(--line); }
:focus-visible { outline: 3px solid #f59e0b; outline-offset: 2px; }
[hidden] { display: none !important; }
#status { min-height: 1.5rem; margin: .5rem 0; }
#status.error { color: #dc2626; }
#chat { grid-column: 1 / -1; }
#chat-log { display: grid; gap: .5rem; max-height: 50vh; overflow-y: auto; margin-bottom: .5rem; }
.msg { padding: .4rem .6rem; border-radius: .5rem; white-space: pre-wrap; overflow-wrap: anywhere; }
.msg.user { background: #2563eb22; justify-self: end; }
.msg.assistant { background: #8882; justify-self: start; }
#sessions-list {
  list-style: none;
  padding: 0;
  margin: 0;
  display: grid;
  gap: .4rem;
  font-size: .9rem;
}
#sessions-list li button { flex: none; }
#sessions-list li {
  display: flex;
  gap: .5rem;
  align-items: center;
  justify-content: space-between;
  overflow-wrap: anywhere;
}
.row { display: flex; flex-wrap: wrap; gap: .4rem; align-items: center; }
.row.spread { justify-content: space-between; }
</style>
</head>
<body>
<header>
  <h1>CloudChat</h1>
  <button id="lang" class="plain" type="button" aria-label="Language">中文</button>
</header>
<p id="status" role="status" aria-live="polite"></p>
<main>
  <section id="account" aria-labelledby="account-h">
    <h2 id="account-h" data-i18n="account">Account</h2>
    <div id="me"><p id="me-info" data-i18n="signedOut">Not signed in.</p></div>
    <div id="signed-in" class="row" hidden>
      <label><span data-i18n="scope">Log out</span>
        <select id="logout-scope">
          <option value="local" data-i18n="scopeLocal">this browser</option>
          <option value="others" data-i18n="scopeOthers">other devices</option>
          <option value="global" data-i18n="scopeGlobal">everywhere</option>
        </select>
      </label>
      <button id="logout" type="button" data-i18n="logout">Log out</button>
    </div>
    <form id="login">
      <h2 data-i18n="login">Log in</h2>
      <label><span data-i18n="identifier">Email or phone</span>
        <input id="login-id" autocomplete="username" required>
      </label>
      <label><span data-i18n="password">Password</span>
        <input id="login-password" type="password" autocomplete="current-password" required>
      </label>
      <button type="submit" data-i18n="login">Log in</button>
    </form>
    <form id="mfa" hidden>
      <label><span data-i18n="mfaCode">Code from your authenticator app, or a recovery code</span>
        <input id="mfa-code" autocomplete="one-time-code" required>
      </label>
      <button type="submit" data-i18n="confirm">Confirm</button>
    </form>
    <form id="register">
      <h2 data-i18n="register">Create an account</h2>
      <label><span data-i18n="email">Email</span>
        <input id="reg-email" type="email" autocomplete="email" required>
      </label>
      <label><span data-i18n="password">Password</span>
        <input id="reg-password" type="password" autocomplete="new-password" minlength="8" required>
      </label>
      <label><span data-i18n="name">Display name (optional)</span>
        <input id="reg-name" autocomplete="nickname">
      </label>
      <button type="submit" data-i18n="register">Create an account</button>
    </form>
  </section>
  <section id="security" aria-labelledby="security-h">
    <h2 id="security-h" data-i18n="sessions">Signed-in devices</h2>
    <div class="row">
      <button id="sessions-refresh" class="plain" type="button" data-i18n="refresh">Refresh</button>
    </div>
    <ul id="sessions-list"></ul>
    <form id="forgot">
      <h2 data-i18n="forgot">Forgot your password?</h2>
      <label><span data-i18n="identifier">Email or phone</span>
        <input id="forgot-id" autocomplete="username" required>
      </label>
      <button type="submit" data-i18n="sendLink">Send me a link</button>
    </form>
    <form id="reset" hidden>
      <h2 data-i18n="reset">Choose a new password</h2>
      <label><span data-i18n="newPassword">New password</span>
        <input id="reset-password" type="password" autocomplete="new-password" minlength="8"
          required>
      </label>
      <button type="submit" data-i18n="save">Save</button>
    </form>
    <div id="verify" hidden>
      <h2 data-i18n="verify">Confirm your email address</h2>
      <button id="verify-button" type="button" data-i18n="confirm">Confirm</button>
    </div>
  </section>
  <section id="chat" aria-labelledby="chat-h">
    <div class="row spread">
      <h2 id="chat-h" data-i18n="chat">Chat</h2>
      <button id="new-chat" class="plain" type="button" data-i18n="newChat">New chat</button>
    </div>
    <div id="chat-log" aria-live="polite"></div>
    <form id="chat-form">
      <label><span data-i18n="message">Message</span>
        <textarea id="chat-input" rows="2" required></textarea>
      </label>
      <button type="submit" data-i18n="send">Send</button>
    </form>
  </section>
</main>
<script>
"use strict";
const TEXT = {
  en: {},
  zh: {
    account: "账户", signedOut: "未登录\u3002", scope: "退出范围", scopeLocal: "此浏览器",
    scopeOthers: "其他设备", scopeGlobal: "所有设备", logout: "退出", login: "登录",
    identifier: "邮箱或手机号", password: "密码", mfaCode: "身份验证器中的验证码\uff0c或恢复码",
    confirm: "确认", register: "注册账户", email: "邮箱", name: "昵称\uff08可选\uff09",
    sessions: "已登录的设备", refresh: "刷新", forgot: "忘记密码\uff1f", sendLink: "发送链接",
    reset: "设置新密码", newPassword: "新密码", save: "保存", verify: "确认邮箱地址", chat: "聊天",
    newChat: "新对话", message: "消息", send: "发送", signedInAs: "已登录\uff1a",
    current: "\uff08当前\uff09", revoke: "移除", done: "完成\u3002",
    linkSent: "如果该账户存在\uff0c链接已发送\u3002", registered: "账户已创建\uff0c请登录\u3002",
    passwordSaved: "密码已更新\uff0c请登录\u3002", verified: "邮箱已确认\u3002",
    loggedOut: "已退出\u3002", thinking: "\u2026\u2026",
  },
};
const EN = {};
for (const el of document.querySelectorAll("[data-i18n]")) EN[el.dataset.i18n] = el.textContent;
Object.assign(EN, {
  signedInAs: "Signed in as ", current: " (this browser)", revoke: "Remove", done: "Done.",
  linkSent: "If the account exists, a link is on its way.", registered: "Account created: log in.",
  passwordSaved: "Password saved: log in.", verified: "Email address confirmed.",
  loggedOut: "Logged out.",
  thinking: "…",
});
TEXT.en = EN;
const served = document.documentElement.lang.startsWith("zh") ? "zh" : "en";
let lang = localStorage.getItem("cloudchat-lang") || served;
const t = (key) => (TEXT[lang] && TEXT[lang][key]) || EN[key] || key;
const $ = (id) => document.getElementById(id);

function applyLang() {
  document.documentElement.lang = lang === "zh" ? "zh-CN" : "en";
  for (const el of document.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  $("lang").textContent = lang === "zh" ? "English" : "中文";
}

function say(text, isError) {
  $("status").textContent = text || "";
  $("status").className = isError ? "error" : "";
}

async function api(method, path, body, quiet) {
  const options = { method, credentials: "same-origin", headers: {} };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  let data = {};
  try {
    data = await response.json();
  } catch (e) {
    data = { ok: false, error: response.statusText };
  }
  data.status = response.status;
  if (!data.ok && !quiet && data.code !== "mfa_required") {
    say(data.error || "Error " + response.status, true);
  }
  return data;
}

async function refreshMe() {
  const data = await api("GET", "auth/me", undefined, true);
  const user = data.ok ? data.user : null;
  const name = user && user.display_name ? " (" + user.display_name + ")" : "";
  $("me-info").textContent = user ? t("signedInAs") + user.email + name : t("signedOut");
  $("signed-in").hidden = !user;
  $("login").hidden = !!user;
  $("register").hidden = !!user;
  $("mfa").hidden = true;
  await (user ? refreshSessions() : clearSessions());
  await loadHistory();
}

function clearSessions() { $("sessions-list").replaceChildren(); }

async function refreshSessions() {
  const data = await api("GET", "auth/sessions");
  clearSessions();
  for (const s of data.sessions || []) {
    const item = document.createElement("li");
    const info = document.createElement("span");
    const seen = s.last_seen_at.slice(0, 16).replace("T", " ");
    const agent = (s.user_agent || "?").slice(0, 60);
    info.textContent = agent + " · " + s.ip + " · " + seen + (s.current ? t("current") : "");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "plain revoke";
    button.textContent = t("revoke");
    button.addEventListener("click", async () => {
      const done = await api("DELETE", "auth/sessions/" + encodeURIComponent(s.id));
      if (done.ok) { say(t("done")); await refreshMe(); }
    });
    item.append(info, button);
    $("sessions-list").append(item);
  }
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("chat-log").append(div);
  $("chat-log").scrollTop = $("chat-log").scrollHeight;
  return div;
}

async function loadHistory() {
  const data = await api("GET", "chat/history");
  $("chat-log").replaceChildren();
  for (const m of data.messages || []) bubble(m.role, m.content);
}

async function sendChat(message) {
  bubble("user", message);
  const answer = bubble("assistant", t("thinking"));
  const response = await fetch("deepseek_chat", {
    method: "POST", credentials: "same-origin",
    headers: { "Content-Type": "application/json" }, body: JSON.stringify({ message }),
  });
  if (!response.ok || !response.body) {
    let data = {};
    try { data = await response.json(); } catch (e) { data = {}; }
    answer.remove();
    say(data.error || "Error " + response.status, true);
    return;
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffered = "", text = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffered += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffered.indexOf("\n")) >= 0) {
      const line = buffered.slice(0, end);
      buffered = buffered.slice(end + 1);
      if (!line.trim()) continue;
      const event = JSON.parse(line);
      if (typeof event.text === "string") { text += event.text; answer.textContent = text; }
      if (event.error) say(event.error, true);
    }
  }
  answer.dataset.done = "1";
}

function on(id, handler) {
  $(id).addEventListener("submit", async (event) => {
    event.preventDefault();
    say("");
    await handler();
  });
}

on("login", async () => {
  const body = { identifier: $("login-id").value, password: $("login-password").value };
  const data = await api("POST", "auth/login", body);
  if (data.ok) { $("login-password").value = ""; await refreshMe(); }
  else if (data.code === "mfa_required") {
    $("login").hidden = true;
    $("mfa").hidden = false;
    $("mfa-code").focus();
    say(data.error);
  }
});
on("mfa", async () => {
  const value = $("mfa-code").value.trim();
  const body = /^[0-9 ]+$/.test(value) ? { code: value } : { recovery_code: value };
  const data = await api("POST", "auth/login/mfa", body);
  $("mfa-code").value = "";
  if (data.ok) await refreshMe();
});
on("register", async () => {
  const body = { email: $("reg-email").value, password: $("reg-password").value };
  if ($("reg-name").value.trim()) body.display_name = $("reg-name").value.trim();
  const data = await api("POST", "auth/register", body);
  if (data.ok) {
    say(t("registered"));
    $("login-id").value = body.email;
    $("reg-password").value = "";
    $("login-password").focus();
  }
});
on("forgot", async () => {
  const data = await api("POST", "auth/password/forgot", { identifier: $("forgot-id").value });
  if (data.ok) say(t("linkSent"));
});
on("reset", async () => {
  const token = new URLSearchParams(location.search).get("token") || "";
  const password = $("reset-password").value;
  const data = await api("POST", "auth/password/reset", { token, password });
  if (data.ok) {
    say(t("passwordSaved"));
    $("reset").hidden = true;
    history.replaceState(null, "", "./");
  }
});
on("chat-form", async () => {
  const message = $("chat-input").value.trim();
  if (!message) return;
  $("chat-input").value = "";
  await sendChat(message);
});
$("chat-input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("chat-form").requestSubmit();
  }
});
$("logout").addEventListener("click", async () => {
  const data = await api("POST", "auth/logout", { scope: $("logout-scope").value });
  if (data.ok) { say(t("loggedOut")); await refreshMe(); }
});
$("sessions-refresh").addEventListener("click", refreshSessions);
$("new-chat").addEventListener("click", async () => {
  const data = await api("POST", "reset_chat");
  if (data.ok) $("chat-log").replaceChildren();
});
$("verify-button").addEventListener("click", async () => {
  const token = new URLSearchParams(location.search).get("token") || "";
  const data = await api("POST", "auth/email/verify", { token });
  if (data.ok) { say(t("verified")); $("verify").hidden = true; await refreshMe(); }
});
$("lang").addEventListener("click", () => {
  lang = lang === "zh" ? "en" : "zh";
  localStorage.setItem("cloudchat-lang", lang);
  applyLang();
  refreshMe();
});

const page = location.pathname.slice(location.pathname.lastIndexOf("/") + 1);
$("reset").hidden = page !== "reset_password";
$("verify").hidden = page !== "verify_email";
applyLang();
refreshMe();
</script>
</body>
</html>"""


def preferred_language(accept_language: str) -> str:
    """ "zh" when Accept-Language prefers Chinese to English, else "en"."""
    best, best_q = "en", -1.0
    for position, part in enumerate(accept_language.split(",")[:20]):
        tag, _, params = part.strip().partition(";")
        quality = 1.0
        if params.strip().startswith("q="):
            try:
                quality = float(params.strip()[2:])
            except ValueError:
                continue
        primary = tag.strip().lower().split("-")[0]
        # Earlier tags win ties, as the header lists them in the visitor's order.
        score = quality - position * 1e-6
        if primary in ("en", "zh") and quality > 0 and score > best_q:
            best, best_q = primary, score
    return best


def _csp_hash(text: str) -> str:
    digest = base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode()
    return f"'sha256-{digest}'"


@functools.cache
def demo_page_policy() -> str:
    """The page's Content-Security-Policy: its own script and style by hash, nothing else
    inline, nothing from elsewhere, never in a frame."""
    script = DEMO_PAGE_HTML.split("<script>", 1)[1].split("</script>", 1)[0]
    style = DEMO_PAGE_HTML.split("<style>", 1)[1].split("</style>", 1)[0]
    return (
        f"default-src 'self'; script-src {_csp_hash(script)}; style-src {_csp_hash(style)};"
        " img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


def serve_demo_page(s: Services) -> bytes:
    """GET /, /reset_password, /verify_email: the demo page (404 when DEMO_PAGE is off)."""
    if not s.cfg.serves_demo_page:
        raise ApiError(404, *_DEFAULT_ERRORS[404])
    language = preferred_language(bottle.request.environ.get("HTTP_ACCEPT_LANGUAGE", ""))
    bottle.response.content_type = "text/html; charset=utf-8"
    bottle.response.set_header("Content-Security-Policy", demo_page_policy())
    bottle.response.set_header("Cache-Control", "no-cache")
    bottle.response.set_header("X-Frame-Options", "DENY")
    bottle.response.set_header("Referrer-Policy", "no-referrer")
    bottle.response.set_header("Vary", "Accept-Language")
    return demo_page_bytes(language)


@functools.cache
def demo_page_bytes(language: str) -> bytes:
    """The page for a language ("en", "zh"), encoded once (not per request)."""
    tag = "zh-CN" if language == "zh" else "en"
    return DEMO_PAGE_HTML.replace("__LANG__", tag, 1).encode("utf-8")


# -- the routing table -------------------------------------------------------------------


class Route(NamedTuple):
    """One endpoint: its method and path, the handler, whether it needs a signed-in user
    (then the handler gets it after the services), and the rate limits it counts."""

    method: str
    path: str
    handler: Callable[..., Any]
    login: bool = False
    limits: tuple[str, ...] = ()


ROUTES = (
    Route("POST", "/auth/register", register, limits=("register_ip", "register_email")),
    Route("POST", "/auth/login", login, limits=("login_ip", "login_id | login_device")),
    Route(
        "POST",
        "/auth/login/mfa",
        login_mfa,
        limits=("login_ip", "login_id | login_device", "mfa_codes"),
    ),
    Route(
        "POST",
        "/auth/mfa/totp/setup",
        mfa_setup,
        login=True,
        limits=("login_ip", "change_session"),
    ),
    Route("POST", "/auth/mfa/totp/confirm", mfa_confirm, login=True, limits=("account",)),
    Route(
        "POST",
        "/auth/mfa/totp/disable",
        mfa_disable,
        login=True,
        limits=("login_ip", "change_session"),
    ),
    Route("POST", "/auth/logout", logout),
    Route("GET", "/auth/me", me, login=True),
    Route("PATCH", "/auth/me", update_me, login=True, limits=("account", "profile")),
    Route("DELETE", "/auth/me", delete_me, login=True, limits=("login_ip", "change_session")),
    Route("GET", "/auth/me/export", export_me, login=True, limits=("account",)),
    Route("GET", "/auth/sessions", list_sessions, login=True, limits=("account",)),
    Route(
        "DELETE",
        "/auth/sessions/<session_id>",
        delete_session,
        login=True,
        limits=("account",),
    ),
    Route("POST", "/auth/password/forgot", forgot_password, limits=("forgot_ip", "forgot_id")),
    Route("POST", "/auth/password/reset", reset_password),
    Route("POST", "/auth/email/verify", verify_email, limits=("token_ip",)),
    Route(
        "POST",
        "/auth/email/resend",
        resend_verification_link,
        limits=("resend_ip", "resend_id"),
    ),
    Route(
        "POST",
        "/auth/email/change",
        change_email,
        login=True,
        limits=("login_ip", "change_session", "email_change_id"),
    ),
    Route(
        "POST",
        "/auth/password/change",
        change_password,
        login=True,
        limits=("login_ip", "change_session"),
    ),
    Route(
        "POST",
        "/deepseek_chat",
        chat,
        limits=("chat_ip", "visitor_ids_ip", "chat_visitor"),
    ),
    Route("POST", "/reset_chat", reset_chat),
    Route("GET", "/chat/history", chat_history, limits=("history_ip",)),
    Route("GET", "/chat/usage", chat_usage, limits=("history_ip",)),
    Route("GET", "/auth/healthz", healthz),
    Route("GET", "/livez", livez),
    Route("GET", "/metrics", metrics_page),
    Route("GET", "/test", timestamp),
    Route("GET", "/", serve_demo_page),
    Route("GET", "/reset_password", serve_demo_page),
    Route("GET", "/verify_email", serve_demo_page),
)


def bind_route(route: Route, s: Services) -> Callable[..., Any]:
    """The route's handler with the services injected (as a Bottle plugin would), and the
    signed-in user for a route that needs one (401 without a live session)."""

    @functools.wraps(route.handler)
    def bound(**url_args: Any) -> Any:
        if not route.login:
            return route.handler(s, **url_args)
        user = current_user(s)
        if user is None:
            raise ApiError(401, "unauthorized", "Unauthorized")
        return route.handler(s, user, **url_args)

    return bound


def create_app(cfg: Config) -> CloudChatApp:
    """Build the WSGI application for a configuration (the app factory)."""
    jobs = BackgroundJobs()
    sql, kv = open_sql_store(cfg), open_kv_store(cfg)
    services = Services(
        cfg=cfg,
        sql=sql,
        kv=kv,
        health=HealthCheck(sql, kv, cfg.health_timeout),
        passwords=PasswordPolicy(cfg),
        hasher=PasswordHasher(cfg),
        jobs=jobs,
        mailer=Mailer(cfg, jobs),
        chat=ChatRelay(cfg, kv, sql),
    )
    metrics.gauges["cloudchat_chat_streams_open"] = (
        "Chat answers streaming now",
        lambda: services.chat.open_streams,
    )
    router = bottle.Bottle()
    router.uninstall("json")  # api_route serialises; one JSON shape everywhere
    router.default_error_handler = _bottle_error
    router.install(api_route)
    for route in ROUTES:
        router.route(route.path, route.method, bind_route(route, services))
    return CloudChatApp(services, router)


_lazy_app: CloudChatApp | None = None
_lazy_app_lock = threading.Lock()


def client_socket(environ: Mapping[str, Any]) -> socket.socket | None:
    """The visitor's socket, to notice a hang-up: CloudChat's own server and gunicorn hand
    it over; other servers do not (there a chat ends when the provider's answer does)."""
    return environ.get("cloudchat.socket") or environ.get("gunicorn.socket")


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
    """WSGI entry point for other servers; built from the environment on the first request.

    What an embedding server must provide, since CloudChat's own HTTP layer is not there:
    gevent (gunicorn -k gevent), a proxy in front that bounds header and body times and
    header sizes (nginx does), and REDIS_URL when it runs more than one worker process.
    """
    global _lazy_app
    if _lazy_app is None:
        with _lazy_app_lock:
            if _lazy_app is None:
                cfg = Config.from_env(os.environ)
                if not logging.getLogger().handlers:
                    setup_logging(cfg)  # the embedding server set up no logging of its own
                _lazy_app = create_app(cfg)
                if not _lazy_app.services.kv.shared:
                    log.warning(
                        "embedded in %s with the in-process store: rate limits and chat"
                        " history belong to this worker process only (pid %d); run one worker,"
                        " or set REDIS_URL to share them",
                        environ.get("SERVER_SOFTWARE", "another WSGI server"),
                        os.getpid(),
                    )
    return _lazy_app(environ, start_response)


###############################################################################
# Server: reading requests strictly, the handler, the connection cap, process tuning
###############################################################################


class SlowRequestError(OSError, ValueError):
    """A client took longer than HEADER_TIMEOUT to send its request line and headers."""


class RequestRejected(ValueError):
    """A request refused before it reaches the application, with a status other than
    pywsgi's plain 400 (a ValueError): the connection closes after the answer."""

    REASONS: ClassVar[dict[int, str]] = {
        431: "Request Header Fields Too Large",
        501: "Not Implemented",
    }

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code

    def response(self) -> bytes:
        """The whole answer, in the JSON envelope."""
        body = _json_bytes({"ok": False, "error": str(self), "code": self.code})
        return (
            f"HTTP/1.1 {self.status} {self.REASONS[self.status]}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nX-Content-Type-Options: nosniff\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode("latin-1") + body


_OVER_CAPACITY_BODY = _json_bytes(
    {"ok": False, "error": "Server is at its connection limit, try again", "code": "over_capacity"}
)
_OVER_CAPACITY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"X-Content-Type-Options: nosniff\r\nRetry-After: 1\r\nConnection: close\r\n"
    + f"Content-Length: {len(_OVER_CAPACITY_BODY)}\r\n\r\n".encode()
    + _OVER_CAPACITY_BODY
)


_SLOW_REQUEST = b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


class _UnreadBody:
    """Stands in for a request body that pywsgi must not drain."""

    def _discard(self) -> None:
        return None


_FIELD_NAME_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110's token
_DIGITS_RE = re.compile(r"[0-9]+")
# nginx's defaults (large_client_header_buffers 4 8k): 8 KiB a line, 32 KiB in all. Beyond,
# 431: ten connections of 99 lines of 64 KiB each held 64 MiB before.
_MAX_HEADER_LINE = 8192
_MAX_HEADER_BLOCK = 32768
_MAX_HEADERS = 100
_RequestHeaders = type(gevent.pywsgi.WSGIHandler.headers)  # the class pywsgi's code expects


def read_request_headers(rfile: Any) -> Any:
    """A request's header block, read strictly as RFC 9112 asks; ValueError if malformed.

    pywsgi hands the block to the email package's parser, which is slow (about 60 us for
    a browser's dozen headers, on every request) and lenient where HTTP must not be: it
    ends the block at a line without a colon, dropping the headers after it, and ignores
    a header with whitespace before its colon. A `Content-Length : 33` that a proxy honours
    and the server ignores is a request smuggled inside a body. Such lines, folded lines
    and a bare CR in a value get a 400 instead; a NUL in a value becomes a space (the
    RFC's other choice, which keeps such a request answered like any other). Plain string
    operations, no regular expression around the value: with optional whitespace on both
    sides of it, a regex backtracks for minutes over one long line of blanks.
    """
    headers = _RequestHeaders()
    count = total = 0
    while True:
        line = rfile.readline(_MAX_HEADER_LINE + 1)
        if line in (b"\r\n", b"\n", b""):
            return headers
        total += len(line)
        if len(line) > _MAX_HEADER_LINE or total > _MAX_HEADER_BLOCK:
            raise RequestRejected(
                431,
                "headers_too_large",
                f"Request headers exceed {_MAX_HEADER_LINE} bytes a line or"
                f" {_MAX_HEADER_BLOCK} in all",
            )
        count += 1
        if count > _MAX_HEADERS:
            raise ValueError(f"more than {_MAX_HEADERS} headers")
        text = line.decode("latin-1")
        if text[-2:] == "\r\n":
            text = text[:-2]
        elif text[-1:] == "\n":
            text = text[:-1]
        else:
            raise ValueError("header line cut short")
        name, colon, value = text.partition(":")
        if not colon or "\r" in value or not _FIELD_NAME_RE.fullmatch(name):
            raise ValueError("malformed header line")
        headers.set_raw(name, value.strip(" \t").replace("\x00", " "))


def answer_and_close(sock: socket.socket, answer: bytes) -> None:
    """Send a final answer and close. Closing with the request unread would reset the
    connection before the client reads the answer, so half-close and let the client hang
    up first (a second and 1 MiB at most)."""
    with contextlib.suppress(OSError):
        sock.sendall(answer)
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(1)
        drained = 0
        while drained < 1 << 20 and (chunk := sock.recv(65536)):
            drained += len(chunk)
    sock.close()


def check_body_framing(lengths: list[str] | None, codings: list[str] | None) -> None:
    """Exactly one `Transfer-Encoding: chunked` or one `Content-Length` of digits, or none.

    Anything else (two lines, `+2`, `0_2`, `gzip, chunked`, a vertical tab) is read by some
    proxy one way and by pywsgi another: the body's bytes would become a request of their
    own. ValueError (400), or RequestRejected (501) for a coding this server lacks.
    """
    if lengths and codings:
        raise ValueError("conflicting Content-Length / Transfer-Encoding")
    if lengths and (len(lengths) > 1 or not _DIGITS_RE.fullmatch(lengths[0])):
        raise ValueError("Content-Length must be one line of digits")
    if not codings:
        return
    if len(codings) > 1:
        raise ValueError("more than one Transfer-Encoding line")
    names = [name.strip(" \t").lower() for name in codings[0].split(",")]
    if names == ["chunked"]:
        return
    if all(_FIELD_NAME_RE.fullmatch(name) for name in names):
        raise RequestRejected(
            501, "unsupported_transfer_coding", "Only Transfer-Encoding: chunked is supported"
        )
    raise ValueError("malformed Transfer-Encoding")


class CloudChatHandler(gevent.pywsgi.WSGIHandler):
    """pywsgi's handler with a deadline for request headers and the client socket in environ."""

    _header_timer: gevent.Timeout | None = None

    def handle_one_request(self) -> Any:
        # A kept-alive client that sends its next request at once would find it waiting
        # and never yield; let the other connections have a turn first (p99 116 -> 25 ms
        # at 50 connections in bench/run.py).
        gevent.sleep(0)
        try:
            result = super().handle_one_request()
            # Stopping: the answer in flight went out; the connection ends with it.
            return None if result is True and self.server.stopping else result
        finally:
            if self._header_timer is not None:
                self._header_timer.close()
                self._header_timer = None

    def read_requestline(self) -> str:
        # Waiting for the next request on a kept-alive connection is bounded by the socket
        # timeout (CLIENT_TIMEOUT); once its first byte is here, the request line and the
        # headers together get HEADER_TIMEOUT, so a client trickling bytes cannot hold a
        # connection for long. OSError ends the connection quietly; ValueError answers 400.
        server: NoDelayWSGIServer = self.server
        server.idle_handlers.add(self)
        try:
            self.rfile.peek(1)
        finally:
            server.idle_handlers.discard(self)
        if server.stopping:
            raise OSError("stopping: no new request on this connection")
        self._header_timer = gevent.Timeout.start_new(
            server.header_timeout,
            SlowRequestError(f"request headers took longer than {server.header_timeout:g} s"),
        )
        try:
            return super().read_requestline()
        except SlowRequestError as exc:
            # Out of time within the request line: the same 400 as within the headers
            # (pywsgi would close without a word, as for a peer that went away).
            self.log_error("%s (from %s)", exc, self.client_address[0])
            answer_and_close(self.socket, _SLOW_REQUEST)
            raise

    def MessageClass(self, rfile: Any, *args: Any) -> Any:
        # The headers, checked before pywsgi drops Content-Length in favour of chunked.
        # ValueError makes pywsgi answer 400 and close, without printing a traceback.
        headers = read_request_headers(rfile)
        check_body_framing(headers.get_all("Content-Length"), headers.get_all("Transfer-Encoding"))
        return headers

    def _handle_client_error(self, ex: Exception) -> Any:
        if isinstance(ex, RequestRejected):
            self.log_error("%s (from %s)", ex, self.client_address[0])
            answer_and_close(self.socket, ex.response())
            return None
        return super()._handle_client_error(ex)

    def log_request(self) -> None:
        """Nothing: CloudChatApp writes the one log line per request."""

    def log_error(self, msg: str, *args: Any) -> None:
        """A client's malformed or too slow request: one INFO line, not an ERROR per scanner."""
        try:
            message = msg % args if args else msg
        except (TypeError, ValueError):
            message = msg
        log.info("client error: %s", _escape(str(message)))

    def get_environ(self) -> dict[str, Any]:
        if self._header_timer is not None:
            self._header_timer.close()
            self._header_timer = None
        environ = super().get_environ()
        environ["cloudchat.socket"] = self.socket  # to notice a visitor hanging up
        return environ

    def run_application(self) -> None:
        try:
            super().run_application()
        finally:
            if self.close_connection:
                # pywsgi then drains any body the app left unread, even though the
                # connection is about to close: a client trickling (or declaring a huge)
                # body would hold the handler regardless. Nothing to drain when closing.
                self.wsgi_input = _UnreadBody()


class NoDelayWSGIServer(gevent.pywsgi.WSGIServer):
    """gevent's WSGI server: Nagle off, client timeouts, and a quick 503 when full."""

    handler_class = CloudChatHandler

    def __init__(self, cfg: Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.client_timeout = cfg.client_timeout
        self.header_timeout = cfg.header_timeout
        self.max_connections = cfg.max_connections or connections_the_fd_limit_allows(cfg)
        self.connections = 0
        self.stop_timeout = cfg.shutdown_grace  # serve_forever's stop() waits this long
        self.stopping = False
        self.idle_handlers: set[CloudChatHandler] = set()  # kept-alive, between requests

    def stop_gracefully(self) -> None:
        """No new connections or requests; what is in flight may finish (serve_forever then
        waits up to SHUTDOWN_GRACE_SECONDS for it). Idle kept-alive connections end now:
        they would otherwise hold the stop for the whole grace period."""
        self.stopping = True
        self.close()
        for handler in list(self.idle_handlers):
            with contextlib.suppress(OSError, AttributeError):
                handler.socket.shutdown(socket.SHUT_RDWR)

    def handle(self, sock: socket.socket, address: Any) -> None:
        if self.connections >= self.max_connections:
            # Refuse in a few bytes instead of running out of file descriptors.
            answer_and_close(sock, _OVER_CAPACITY)
            return
        self.connections += 1
        try:
            # pywsgi writes headers and body separately; with Nagle on, delayed ACKs stall
            # every keep-alive response by tens of milliseconds.
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(self.client_timeout)
            super().handle(sock, address)
        finally:
            self.connections -= 1


def connections_the_fd_limit_allows(cfg: Config) -> int:
    """Client connections that fit the open-file limit: each may hold a provider socket too."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 10_000
    # What the process holds besides client and provider sockets: the pools at their
    # fullest and the health check's own connection to each store, and 32 for the
    # listening socket, the event loop, logs, SQLite's files, mail and the thread pool.
    # (Idle provider connections are at most as many as were in use lately.)
    reserve = (cfg.redis_pool_size + 1 if cfg.uses_redis else 0) + 32
    reserve += cfg.db_pool_size + 1 if cfg.database_url else 0
    return max(8, (soft - reserve) // 2)


def process_stats(server: NoDelayWSGIServer) -> str:
    """Counts an operator (or a soak test) wants to see stay flat: `kill -USR1 <pid>`."""
    greenlets = sum(1 for obj in gc.get_objects() if isinstance(obj, gevent.Greenlet))
    try:
        descriptors = os.listdir("/proc/self/fd")
    except OSError:
        descriptors = []
    return (
        f"connections={server.connections} greenlets={greenlets} open_fds={len(descriptors)}"
        f" rss_kib={_rss_kib()}"
    )


def _rss_kib() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def return_large_blocks_to_os() -> None:
    """Ask glibc to serve large allocations from mmap always, so freeing them shrinks RSS."""
    # glibc raises its mmap threshold after the first large block is freed; from then on
    # each 19 MiB Argon2 block comes from a heap arena that never shrinks, and every
    # hashing thread keeps ~20 MiB resident for good. A fixed threshold stops that.
    m_mmap_threshold = -3
    try:
        ctypes.CDLL("libc.so.6").mallopt(m_mmap_threshold, 128 * 1024)
    except (OSError, AttributeError):
        log.debug("not glibc: mmap threshold left as it is")


###############################################################################
# main() and the command line
###############################################################################


def check_schema_version(sql: SqlStore) -> None:
    """Refuse a PostgreSQL schema older or newer than this server (SchemaVersionError); a
    database that does not answer yet is the health check's business, not a refusal."""
    try:
        version = get_schema_version(sql)
    except StoreUnavailable as exc:
        log.warning("schema version not checked, the database did not answer: %s", exc)
        return
    except psycopg2.ProgrammingError:
        version = 0  # no schema_migrations table: made before versions were recorded
    if version < SCHEMA_VERSION:
        raise SchemaVersionError(
            f"the database's schema is version {version}, older than this server's"
            f" {SCHEMA_VERSION}: back it up, then run `python cloudchat.py initdb`"
        )
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"the database's schema is version {version}, newer than this server's"
            f" {SCHEMA_VERSION}: run the release that made it (or a newer one)"
        )


SHUTDOWN_STREAM_MARGIN = 1.0  # seconds of the grace left to write the streams' error lines


def serve(cfg: Config) -> int:
    """Serve until SIGTERM or SIGINT; let requests in flight finish within the grace period."""
    if not gevent.monkey.is_module_patched("socket"):
        log.error(
            "gevent has not patched the standard library: run `python cloudchat.py`, or call"
            " gevent.monkey.patch_all() before importing cloudchat"
        )
        return 2
    return_large_blocks_to_os()
    application = create_app(cfg)
    if cfg.database_url:
        check_schema_version(application.services.sql)
    log.info(
        "storage: %s, %s",
        "PostgreSQL" if cfg.database_url else f"SQLite file {cfg.db_path}",
        ("Redis through Sentinel" if cfg.redis_sentinels else "Redis")
        if cfg.uses_redis
        else "in-process key-value store (one process only)",
    )
    if cfg.chat_providers:
        log.info("chat providers: %s", ", ".join(p.name for p in cfg.chat_providers))
    else:
        log.warning("chat: no model provider key, the offline echo provider answers (development)")
    server = NoDelayWSGIServer(
        cfg,
        (cfg.host, cfg.port),
        application,
        # A pool of handlers is what lets stop() wait for the requests in flight.
        spawn=gevent.pool.Pool(),
        # gevent's default of 128 left hundreds of a burst of connects to the kernel's
        # one-second SYN retry.
        backlog=1024,
        log=None,
        error_log=gevent.pywsgi.LoggingLogAdapter(log, logging.ERROR),
    )
    stopping_since: list[float] = []

    def stop(signum: int) -> None:
        if stopping_since:
            return
        log.info("signal %d: no new connections, grace %g s", signum, cfg.shutdown_grace)
        stopping_since.append(time.monotonic())
        server.stop_gracefully()
        # A second before the grace is over, streams still running get their error line
        # and end, so that no visitor sees a connection cut without a word.
        margin = min(SHUTDOWN_STREAM_MARGIN, cfg.shutdown_grace / 2)
        gevent.spawn_later(cfg.shutdown_grace - margin, application.services.chat.end_streams)

    # Handlers before the "listening" line: a SIGUSR1 (or SIGTERM) sent as soon as it
    # appears would otherwise meet the default action, which ends the process.
    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, stop, signum)
    gevent.signal_handler(signal.SIGUSR1, lambda: log.info("stats %s", process_stats(server)))
    try:
        server.start()
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", cfg.host, cfg.port, exc.strerror or exc)
        application.close()
        return 2
    host, port = server.address[:2]
    log.info("cloudchat %s listening on http://%s:%d", __version__, host, port)
    log.info("at most %d client connections at once", server.max_connections)
    cleaner = None
    if cfg.cleanup_interval:
        cleaner = gevent.spawn(cleanup_forever, application.services.sql, cfg)
    server.serve_forever()
    if cleaner is not None:
        cleaner.kill(block=False)
    # Queued mail shares the one grace period with the requests in flight.
    spent = time.monotonic() - stopping_since[0] if stopping_since else 0.0
    application.services.jobs.wait(max(0.5, cfg.shutdown_grace - spent))
    application.close()
    log.info("stopped")
    return 0


def initdb(cfg: Config) -> int:
    """Create or update the tables; safe to run again."""
    if cfg.database_url:
        try:
            with open(SCHEMA_PATH, encoding="utf-8") as schema_file:
                script = schema_file.read()
        except OSError as exc:
            print(
                f"cloudchat: cannot read {SCHEMA_PATH} ({exc.strerror}); keep schema.sql"
                " beside cloudchat.py",
                file=sys.stderr,
            )
            return 1
        store: SqlStore = PostgresStore(cfg.database_url, 1, cfg.db_timeout)
    else:
        script = SQLITE_SCHEMA
        store = SqliteStore(cfg.db_path, cfg.db_timeout)
    try:
        store.apply_schema(script)
    except StoreUnavailable as exc:
        print(f"cloudchat: initdb failed: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    log.info("schema applied to %s", "PostgreSQL" if cfg.database_url else cfg.db_path)
    return 0


class CommandError(Exception):
    """A command-line command cannot do what it was asked; the message says why."""


@contextlib.contextmanager
def open_stores(cfg: Config) -> Iterator[tuple[SqlStore, KeyValueStore]]:
    """The server's stores, for a command; a store that does not answer is a CommandError."""
    sql, kv = open_sql_store(cfg), open_kv_store(cfg)
    try:
        yield sql, kv
    except StoreUnavailable as exc:
        raise CommandError(str(exc)) from exc
    finally:
        kv.close()
        sql.close()


def find_account(sql: SqlStore, address: str) -> User:
    """The account with this email address (read leniently: an old account's odd address
    must be reachable); CommandError if there is none."""
    email = lookup_email(address)
    if email is None:
        raise CommandError(f"not an email address: {address!r}")
    user = get_user_by_email(sql, email)
    if user is None:
        raise CommandError(f"no account with the email {address!r}")
    return user


def command_origin(command: str) -> Origin:
    """The audit log's 'from where' of an operator's command."""
    return ("", f"cloudchat.py {command}", "")


def set_account_active(cfg: Config, address: str, active: bool) -> None:
    """deactivate / activate EMAIL: deactivation ends the account's sessions at once."""
    with open_stores(cfg) as (sql, kv):
        user = find_account(sql, address)
        set_user_active(sql, user.email, active)
        # Through CloudChat rather than a bare UPDATE: the cached sessions go too, so the
        # account's next request is refused instead of up to SESSION_CACHE_SECONDS later.
        ended = 0 if active else revoke_user_sessions(sql, kv, cfg, user.id)
        event = "activated" if active else "deactivated"
        origin = command_origin(event[:-1])
        record_event(sql, event, user.id, origin, by="admin", revoked_sessions=ended)
    state = "active" if active else f"inactive, {ended} live session(s) ended"
    print(f"account {user.id} is {state}")


def logout_user(cfg: Config, address: str) -> None:
    """logout-user EMAIL: end every session of the account at once."""
    with open_stores(cfg) as (sql, kv):
        user = find_account(sql, address)
        ended = revoke_user_sessions(sql, kv, cfg, user.id)
        origin = command_origin("logout-user")
        record_event(
            sql, "logout", user.id, origin, scope="global", by="admin", revoked_sessions=ended
        )
    print(f"account {user.id}: {ended} live session(s) ended")


def delete_user_command(cfg: Config, address: str) -> None:
    """delete-user EMAIL: the account and everything tied to it are gone."""
    with open_stores(cfg) as (sql, kv):
        user = find_account(sql, address)
        if not delete_account(sql, kv, cfg, user, command_origin("delete-user"), by="admin"):
            raise CommandError(f"account {user.id} was deleted meanwhile")
    print(f"account {user.id} deleted")


def export_user(cfg: Config, address: str) -> None:
    """export-user EMAIL: everything stored about the account, as JSON on stdout."""
    with open_stores(cfg) as (sql, kv):
        export = export_account(sql, kv, find_account(sql, address))
    print(json.dumps(export, indent=2, ensure_ascii=False))


def print_reset_link(cfg: Config, address: str) -> None:
    """reset-link EMAIL: a single-use password-reset link, printed (for the operator to
    hand over), valid PWRESET_TOKEN_TTL; any older link stops working."""
    with open_stores(cfg) as (sql, _):
        user = find_account(sql, address)
        if not user.is_active:
            raise CommandError(f"account {user.id} is inactive: `activate` it first")
        token = new_token()
        expires_at = utcnow() + dt.timedelta(seconds=cfg.pwreset_token_ttl)
        replace_reset_token(sql, user.id, token_hash(token), expires_at)
        record_event(sql, "reset_link_issued", user.id, command_origin("reset-link"), by="admin")
    print(f"{cfg.frontend_base_url}/reset_password?token={token}")
    print(f"valid until {_iso(expires_at)}, once", file=sys.stderr)


def mfa_reset(cfg: Config, address: str) -> None:
    """mfa-reset EMAIL: switch the account's two-factor sign-in off (a lost phone and no
    recovery code left); the password alone signs in again."""
    with open_stores(cfg) as (sql, kv):
        user = find_account(sql, address)
        if not delete_totp(sql, user.id):
            raise CommandError(f"account {user.id} has no two-factor sign-in")
        refresh_cached_sessions(sql, kv, cfg, user.id)
        record_event(sql, "mfa_reset", user.id, command_origin("mfa-reset"), by="admin")
    print(f"account {user.id}: two-factor sign-in switched off")


def verify_email_command(cfg: Config, address: str) -> None:
    """verify-email EMAIL: mark the account's present address verified."""
    with open_stores(cfg) as (sql, kv):
        user = find_account(sql, address)
        set_email_verified(sql, user.id)
        refresh_cached_sessions(sql, kv, cfg, user.id)
        record_event(sql, "email_verified", user.id, command_origin("verify-email"), by="admin")
    print(f"account {user.id}: email address verified")


# Rate-limit counters keyed by a client's address, which `unlock ADDRESS` clears.
ADDRESS_LIMIT_ACTIONS = (
    "login_ip",
    "register_ip",
    "forgot_ip",
    "resend_ip",
    "token_ip",
    "chat_ip",
    "visitor_ids_ip",
)


def unlock(cfg: Config, target: str) -> None:
    """unlock IDENTIFIER|ADDRESS: clear the rate-limit counters of an account (email or
    phone) or of a client address (IPv6: its IPV6_PREFIX_LENGTH network)."""
    with open_stores(cfg) as (sql, kv):
        if not kv.shared:
            raise CommandError(
                "without REDIS_URL the counters live inside the server process: restart it"
                " to clear them"
            )
        try:
            whose = address_key(str(ipaddress.ip_address(target.strip())), cfg.ipv6_prefix_length)
        except ValueError:
            whose = None
        if whose is not None:
            keys = rate_limit_keys(ADDRESS_LIMIT_ACTIONS, whose)
            what, user_id = f"address {whose}", None
        else:
            email, phone = parse_identifier(target.strip())
            found = get_password_login(sql, email, phone) if (email or phone) else None
            if found is None:
                raise CommandError(f"no account and no IP address: {target!r}")
            keys, what, user_id = (
                account_limit_keys(found[0]),
                f"account {found[0].id}",
                found[0].id,
            )
        cleared = kv.delete(*keys)
        record_event(sql, "unlocked", user_id, command_origin("unlock"), by="admin")
    print(f"{what}: {cleared} rate-limit counter(s) cleared")


def list_users(cfg: Config, search: str, limit: int) -> None:
    """users [--search S] [--limit N]: accounts, newest first."""
    with open_stores(cfg) as (sql, _):
        rows = search_users(sql, search, limit)
    for user_id, address, phone, name, active, verified, created in rows:
        flags = ",".join(
            flag for flag, on in (("inactive", not active), ("verified", verified)) if on
        )
        print(
            f"{user_id}\t{address}\t{phone or '-'}\t{name or '-'}\t{flags or '-'}\t{_iso(created)}"
        )
    print(f"{len(rows)} account(s)", file=sys.stderr)


def show_user(cfg: Config, address: str) -> None:
    """user EMAIL: the profile, live sessions and the latest audit events of an account."""
    with open_stores(cfg) as (sql, _):
        user = find_account(sql, address)
        record = get_user_record(sql, user.id) or {}
        idle = dt.timedelta(seconds=cfg.session_idle_seconds)
        sessions = list_user_sessions(sql, user.id, idle)
        events = list_auth_events(sql, user.id, dt.datetime(1970, 1, 1, tzinfo=dt.UTC), 20)
    print(f"account {user.id} ({record.get('uid')})")
    for name in ("email", "phone", "display_name", "is_active"):
        print(f"  {name}: {record.get(name)}")
    print(f"  created_at: {_iso(record.get('created_at'))}")
    print(f"  email_verified_at: {_iso(record.get('email_verified_at'))}")
    print(f"live sessions: {len(sessions)}")
    for id_hash, agent, ip, created, seen, expires in sessions:
        print(
            f"  {session_public_id(id_hash)}  {ip or '-'}  since {_iso(created)}"
            f"  seen {_iso(seen or created)}  until {_iso(expires)}  {agent or '-'}"
        )
    print(f"latest events: {len(events)}")
    for row in events:
        print("  " + format_event(row))


def format_event(row: tuple) -> str:
    """One audit row as a line: time, account, event, address, detail, request id."""
    at, user_id, event, detail, ip, agent, rid = row
    account = f"user {user_id}" if user_id is not None else "-"
    parts = [_iso(at), account, event, ip or "-", detail or "", f"rid={rid}" if rid else ""]
    parts.append(f"ua={agent!r}" if agent else "")
    return "  ".join(part for part in parts if part)


_SINCE_RE = re.compile(r"(\d{1,6})([smhd])")
_SINCE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str) -> dt.timedelta:
    """'7d', '12h', '30m', '90s' as a time span; ValueError otherwise."""
    match = _SINCE_RE.fullmatch(text.strip())
    if not match:
        raise ValueError(f"not a time span like 7d, 12h, 30m: {text!r}")
    return dt.timedelta(seconds=int(match[1]) * _SINCE_UNITS[match[2]])


def show_audit(
    cfg: Config, address: str | None, since: dt.timedelta, as_json: bool, limit: int
) -> None:
    """audit [EMAIL] [--since 7d] [--json]: the audit log, oldest first."""
    with open_stores(cfg) as (sql, _):
        user_id = find_account(sql, address).id if address else None
        rows = list_auth_events(sql, user_id, utcnow() - since, limit)
    for row in rows:
        if as_json:
            print(json.dumps(event_record(row), ensure_ascii=False))
        else:
            print(format_event(row))


def show_usage(cfg: Config, days: int, by: str, as_json: bool) -> None:
    """usage [--days 7] [--by user|model|day] [--json]: chat tokens over the last days
    (today included), the largest first."""
    since = utc_day(utcnow() - dt.timedelta(days=days - 1))
    with open_stores(cfg) as (sql, _):
        rows = usage_report(sql, since, by)
    total = 0
    for what, requests, prompt, completion, estimated in rows:
        tokens = int(prompt) + int(completion)
        total += tokens
        if as_json:
            record = {by: what, "requests": int(requests), "prompt_tokens": int(prompt)}
            record.update(completion_tokens=int(completion), estimated=int(estimated))
            print(json.dumps(record, ensure_ascii=False))
        else:
            note = f"  ({int(estimated)} estimated)" if estimated else ""
            print(f"{what}\t{int(requests)} answers\t{tokens} tokens{note}")
    if not as_json:
        print(f"{total} tokens since {since} (UTC)", file=sys.stderr)


def cleanup_command(cfg: Config) -> None:
    """cleanup: delete ended sessions, used and expired links, old audit rows, now."""
    with open_stores(cfg) as (sql, _):
        deleted = run_cleanup(sql, cfg)
    if deleted is None:
        raise CommandError("another process holds the cleanup lock; try again later")
    print(", ".join(f"{count} {table}" for table, count in deleted.items()) + " deleted")


def check_config(environ: Mapping[str, str]) -> int:
    """Command line: print the effective configuration (secrets masked) and every problem."""
    cfg, problems, unsafe = Config.examine_env(environ)
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if field.name == "chat_providers":
            shown = ", ".join(f"{p.name} {p.model} at {p.base_url}" for p in value) or "(none)"
        elif not field.repr:
            shown = redact_url(value) if "://" in value else ("***" if value else "(unset)")
        elif isinstance(value, tuple):
            shown = ",".join(str(item) for item in value)
        elif isinstance(value, RateLimit):
            shown = f"{value.limit}/{value.window}"
        else:
            shown = str(value)
        print(f"{field.name} = {shown}")
    for problem in problems:
        print(f"problem: {problem}")
    for problem in unsafe:
        print(f"unsafe in production: {problem}")
    if problems or unsafe:
        return 2
    print("configuration ok")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command line: serve by default, or one of the operator's commands."""
    parser = argparse.ArgumentParser(
        prog="cloudchat.py",
        description="CloudChat server and its operator's commands. Settings come from"
        " environment variables (see config.example.env); every command uses the same ones"
        " as the server.",
    )
    parser.add_argument("--version", action="version", version=f"cloudchat {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, help_text: str, *args: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        for arg in args:
            sub.add_argument(arg)
        return sub

    command("serve", "run the HTTP server on HOST:PORT (the default)")
    command(
        "initdb",
        "create the tables, or upgrade them to this release's schema (back up first); safe"
        " to run again",
    )
    command(
        "check-config",
        "print the configuration the environment gives (secrets masked) and every problem"
        " in it; exit 0 if none, else 2",
    )
    command(
        "cleanup",
        "delete ended sessions, used and expired links and audit rows past"
        " AUDIT_RETENTION_DAYS now (the server also does it every CLEANUP_INTERVAL_SECONDS)",
    )
    audit_cmd = command("audit", "print the audit log, oldest first")
    audit_cmd.add_argument("email", nargs="?", help="only this account's events")
    audit_cmd.add_argument(
        "--since", default="7d", type=parse_since, help="how far back: 90s, 30m, 12h, 7d"
    )
    audit_cmd.add_argument("--json", action="store_true", help="one JSON object a line")
    audit_cmd.add_argument("--limit", type=int, default=10_000, help="at most this many")
    usage_cmd = command("usage", "chat tokens of the last days, by user, model or day")
    usage_cmd.add_argument("--days", type=int, default=7, help="today and the days before")
    usage_cmd.add_argument("--by", choices=tuple(USAGE_GROUPS), default="user")
    usage_cmd.add_argument("--json", action="store_true", help="one JSON object a line")
    users_cmd = command("users", "list accounts, newest first")
    users_cmd.add_argument("--search", default="", help="email, phone or name contains this")
    users_cmd.add_argument("--limit", type=int, default=50)
    command("user", "show an account: profile, live sessions, latest events", "email")
    command("logout-user", "end every session of an account at once", "email")
    command("delete-user", "delete an account and everything stored about it", "email")
    command("export-user", "print everything stored about an account, as JSON", "email")
    command("reset-link", "print a single-use password-reset link for an account", "email")
    command(
        "unlock",
        "clear the rate-limit counters of an account (email or phone) or a client address",
        "target",
    )
    command("verify-email", "mark an account's email address verified", "email")
    command(
        "mfa-reset",
        "switch an account's two-factor sign-in off (lost phone, no recovery code left)",
        "email",
    )
    command("deactivate", "refuse an account's logins and end its sessions at once", "email")
    command("activate", "allow a deactivated account again", "email")
    return parser


def run_command(cfg: Config, args: argparse.Namespace) -> int:
    """Run an operator's command (not serve, not check-config); its exit code."""
    name = args.command
    try:
        if name == "initdb":
            return initdb(cfg)
        if name == "cleanup":
            cleanup_command(cfg)
        elif name == "audit":
            show_audit(cfg, args.email, args.since, args.json, max(1, args.limit))
        elif name == "users":
            list_users(cfg, args.search, max(1, args.limit))
        elif name == "usage":
            show_usage(cfg, max(1, args.days), args.by, args.json)
        elif name == "unlock":
            unlock(cfg, args.target)
        else:
            by_email: dict[str, Callable[[Config, str], None]] = {
                "user": show_user,
                "logout-user": logout_user,
                "delete-user": delete_user_command,
                "export-user": export_user,
                "reset-link": print_reset_link,
                "verify-email": verify_email_command,
                "mfa-reset": mfa_reset,
                "deactivate": functools.partial(set_account_active, active=False),
                "activate": functools.partial(set_account_active, active=True),
            }
            by_email[name](cfg, args.email)
    except (CommandError, ValueError) as exc:
        print(f"cloudchat: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command line: serve (the default) or one of the commands `--help` lists."""
    args = build_parser().parse_args(argv)
    command = args.command or "serve"
    if command == "check-config":
        return check_config(os.environ)
    try:
        cfg = Config.from_env(os.environ)
    except UnsafeConfigError as exc:
        print(f"cloudchat: refusing to start: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"cloudchat: configuration error: {exc}", file=sys.stderr)
        return 2
    # A command's stdout is its result (export-user > file.json); its log goes to stderr.
    setup_logging(cfg, None if command == "serve" else sys.stderr)
    try:
        if command == "serve":
            return serve(cfg)
        if command != "initdb" and cfg.database_url:
            with open_stores(cfg) as (sql, _):
                check_schema_version(sql)
        return run_command(cfg, args)
    except SchemaVersionError as exc:
        print(f"cloudchat: refusing to start: {exc}", file=sys.stderr)
        return 2
    except CommandError as exc:
        print(f"cloudchat: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
