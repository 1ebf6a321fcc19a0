"""Service settings: command-line flags, then NUDGES_* environment variables, then the YAML file
given by --config, then defaults that work on a fresh clone (SQLite file, bundled rules, loopback)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


def bundled(name: str) -> Path:
    """A folder shipped with nudges (rules, seeds, fhir_fixtures): inside the installed package, where the
    wheel puts it (setup.py), else beside the package in a clone of the repository."""
    package = Path(__file__).resolve().parent
    installed = package / "_bundled" / name
    return installed if installed.is_dir() else package.parent / name


BUNDLED_RULES = bundled("rules")


class ClientSettings(BaseModel):
    """One trusted CDS client (EHR): its issuer and where its public keys are."""

    model_config = ConfigDict(extra="forbid")

    iss: str
    jwks_url: str | None = None
    jwks_file: Path | None = None
    jku_allowlist: list[str] = Field(default_factory=list)
    fhir_servers: list[str] = Field(default_factory=list, description="allowed fhirServer base URLs")
    tenant: str | None = None


class AuthSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    clients: list[ClientSettings] = Field(default_factory=list)
    allow_unauthenticated: bool = False
    algorithms: list[str] = Field(default_factory=lambda: ["ES384", "RS384"])
    leeway_seconds: int = 60
    jwks_refresh_seconds: int = 300
    max_token_lifetime_seconds: int = 3600


class ProxyAuthSettings(BaseModel):
    """Console sign-in through a reverse proxy that authenticates people (SSO: oauth2-proxy, Apache
    mod_auth_openidc, an ingress with OIDC) and passes who they are in a header. The header is believed
    only on connections from `trusted_proxies`; from anywhere else the console is refused, so a client
    that reaches the service directly cannot claim to be someone."""

    model_config = ConfigDict(extra="forbid")

    user_header: str = Field("X-Forwarded-User", description="header carrying the signed-in user's name")
    groups_header: str | None = Field("X-Forwarded-Groups", description="header with the user's groups (comma "
                                                                         "separated), or null")
    trusted_proxies: list[str] = Field(min_length=1, description="proxy addresses or networks (CIDR) whose "
                                                                 "headers are believed, e.g. 127.0.0.1/32")
    allowed_users: list[str] = Field(default_factory=list, description="who may use the console (empty: "
                                                                       "anyone the proxy signed in, unless "
                                                                       "allowed_groups is set)")
    allowed_groups: list[str] = Field(default_factory=list, description="groups whose members may use it")
    reader_users: list[str] = Field(default_factory=list, description="who may read the rule pages only (what a "
                                                                      "card's 'Why this nudge' link opens), "
                                                                      "e.g. clinicians")
    reader_groups: list[str] = Field(default_factory=list, description="groups whose members may read the rule "
                                                                       "pages only")


class ConsoleSettings(BaseModel):
    """The web console under /console/: on loopback it needs no sign-in, like the API; reached any other
    way it is refused unless `proxy_auth` is configured."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    proxy_auth: ProxyAuthSettings | None = None


class FhirBackendClient(BaseModel):
    """The service's own registration at an EHR's FHIR server (SMART Backend Services), for reads no
    hook call authorizes: id-only notifications and follow-up checks."""

    model_config = ConfigDict(extra="forbid")

    base: str = Field(description="FHIR base URL these credentials are for (matched as a prefix)")
    token_url: str = Field(description="the server's OAuth 2.0 token endpoint")
    client_id: str
    private_key_file: Path = Field(description="PEM private key, or a JWK / JWK Set JSON file with the private key")
    key_id: str | None = Field(None, description="`kid` of the registered public key (taken from a JWK if unset)")
    algorithm: Literal["RS384", "ES384"] = "RS384"
    scope: str = "system/*.read"


class Pool(BaseModel):
    """A configured group of recipients a rule may address by name (an on-call PractitionerRole, a Group)."""

    model_config = ConfigDict(extra="forbid")

    reference: str = Field(pattern=r"^[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}$",
                           description="relative reference on the FHIR server written to, e.g. PractitionerRole/oncall")
    display: str | None = None


class WebhookEndpoint(BaseModel):
    """A receiver of signed CloudEvents (secure chat, paging)."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(description="https (http only on loopback)")
    secret: SecretStr = Field(description="Standard Webhooks secret: whsec_ + base64 of 24 to 64 random bytes")
    timeout_seconds: float = Field(default=10.0, gt=0, le=60)


class DeliverySettings(BaseModel):
    """Push delivery of follow-up cards (the outbox): where they go and how hard to try."""

    model_config = ConfigDict(extra="forbid")

    poll_seconds: float = Field(default=5.0, description="how often the outbox is sent (0 disables)")
    fhir_server: str | None = Field(
        default=None, description="FHIR base Communications and Tasks are written to (default: the server the "
                                  "follow-up's data came from)")
    pools: dict[str, Pool] = Field(default_factory=dict, description="name -> recipient, for `pool:` in rules")
    webhooks: dict[str, WebhookEndpoint] = Field(
        default_factory=dict, description="name -> endpoint, for `endpoint:` in rules")
    sender: str | None = Field(
        default=None, description="sender reference (Communication.sender, Task.requester), e.g. Device/nudges")
    rule_page_url: str | None = Field(
        default=None, description="link sent with each push, {rule} replaced by the rule id (default: the "
                                  "console's rule page at public_base_url, else the card's source)")
    timeout_seconds: float = Field(default=10.0, gt=0, le=60, description="per FHIR write")
    max_attempts: int = Field(default=8, ge=1, le=50, description="a delivery is dead after this many attempts")
    retry_seconds: float = Field(
        default=30.0, gt=0, description="first retry after this, doubling each time (at most 1 h)")
    lease_seconds: float = Field(
        default=120.0, gt=0, description="a delivery claimed this long ago and not finished (its replica died) is "
                                         "claimed again")


class SubscriptionServer(BaseModel):
    """A FHIR server nudges subscribes to, and which of its SubscriptionTopics serve which start clauses."""

    model_config = ConfigDict(extra="forbid")

    base: str
    topics: dict[str, str] = Field(
        description="resource type (or Type:valueset, which wins) -> SubscriptionTopic canonical URL")
    filters: dict[str, str] = Field(
        default_factory=dict,
        description="topic canonical -> backport filter criteria, e.g. Observation?category=laboratory")


class SubscriptionSettings(BaseModel):
    """Managed topic-based Subscriptions (R4 Backport IG): `nudges subscriptions plan|apply|status`."""

    model_config = ConfigDict(extra="forbid")

    endpoint: str | None = Field(
        default=None, description="notification URL the servers post to (default: public_base_url + "
                                  "/fhir/notifications)")
    servers: list[SubscriptionServer] = Field(default_factory=list)
    heartbeat_seconds: int = Field(default=60, ge=1, description="heartbeat period asked of the server")
    timeout_seconds: int = Field(default=10, ge=1, le=60, description="backport-timeout asked of the server")
    check_seconds: float = Field(
        default=30.0, description="how often subscriptions are checked for missed events (0 disables)")
    missed_heartbeats: int = Field(
        default=3, ge=1, description="degraded after this many heartbeat periods of silence")
    gap_grace_seconds: float = Field(
        default=60.0, ge=0, description="a gap in event numbers is a loss once it lasts this long (notifications "
                                        "may arrive out of order)")
    recovery_window_hours: float = Field(
        default=24.0, gt=0, description="how far back a recovery search looks when no event time is known")


def _duration(text: str) -> str:
    from .rules.schema import parse_duration

    parse_duration(text)
    return text


Duration = Annotated[str, AfterValidator(_duration)]


class SuppressionSettings(BaseModel):
    """How long a card stays away from its focus (suppression.py): durations such as 5m, 12h, 30d."""

    model_config = ConfigDict(extra="forbid")

    ignored: Duration = Field(
        default="5m", description="a card shown and not answered (or never displayed): enough to stop repeats on a "
                                  "chart refresh")
    accepted: Duration = Field(default="30d", description="after `accepted`, for rules without `suppress`")
    overridden: Duration = Field(
        default="7d", description="after `overridden`, for a reason without a lockout of its own, on a rule "
                                  "without `suppress`")
    snooze: Duration = Field(default="1h", description="after the service's own 'remind me later' reason")

    @staticmethod
    def _window(text: str) -> timedelta:
        from .rules.schema import parse_duration

        return parse_duration(text)

    @property
    def ignored_window(self) -> timedelta:
        return self._window(self.ignored)

    @property
    def accepted_window(self) -> timedelta:
        return self._window(self.accepted)

    @property
    def overridden_window(self) -> timedelta:
        return self._window(self.overridden)

    @property
    def snooze_window(self) -> timedelta:
        return self._window(self.snooze)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NUDGES_", env_nested_delimiter="__", extra="forbid")

    host: str = "127.0.0.1"
    port: int = 8080
    rules: Path = BUNDLED_RULES
    site_valuesets: Path | None = Field(
        default=None, description="folder of a site's own codes for shipped value sets (<name>.yaml or FHIR "
                                  "ValueSet <name>.json), e.g. local order codes; reloaded with the rules")
    database_url: str = "sqlite:///nudges.db"
    now: str | None = Field(default=None, description="pin the clock (ISO 8601 instant)")
    rule_statuses: list[str] = Field(default_factory=lambda: ["active"])
    reload_interval_seconds: float = 2.0
    max_body_bytes: int = 10 * 1024 * 1024
    keepalive_requests: int = Field(
        default=100, ge=0, description="requests on one keep-alive connection before the answer says "
                                       "`Connection: close` (0: never), so clients re-connect and spread over workers")
    fhir_timeout_seconds: float = 2.0
    fhir_max_pages: int = 5
    fhir_max_connections_per_server: int = Field(
        default=6, ge=1, description="concurrent requests to one FHIR server; more wait for a connection")
    fhir_allow_http: bool = Field(default=False, description="allow http:// FHIR servers off loopback")
    fhir_server_allowlist: list[str] = Field(default_factory=list)
    fhir_backend_clients: list[FhirBackendClient] = Field(
        default_factory=list, description="credentials for the service's own reads (SMART Backend Services)")
    subscription_servers: dict[str, str] = Field(
        default_factory=dict, description="subscription reference -> FHIR server base for id-only notifications")
    followup_poll_seconds: float = Field(default=15.0, description="how often due follow-ups run (0 disables)")
    pending_card_max_age_hours: float = Field(
        default=720.0, gt=0, description="a follow-up card not shown within this long is dropped, never shown")
    patient_hash_key: SecretStr | None = None
    cors_origins: list[str] = Field(default_factory=list)
    public_base_url: str | None = None
    tls_certfile: Path | None = Field(default=None, description="serve HTTPS directly (else terminate TLS in front)")
    tls_keyfile: Path | None = None
    log_level: str = "INFO"
    access_log: bool = Field(
        default=False, description="a log line per HTTP request (logger nudges.access: method, path without its "
                                   "query, status, milliseconds, client address); no bodies, headers or query strings")
    log_format: Literal["json", "text"] = Field(
        default="json", description="json: one JSON object a line (for log collectors); text: plain lines for people")
    auth: AuthSettings = Field(default_factory=AuthSettings)
    delivery: DeliverySettings = Field(default_factory=DeliverySettings)
    subscriptions: SubscriptionSettings = Field(default_factory=SubscriptionSettings)
    console: ConsoleSettings = Field(default_factory=ConsoleSettings)
    suppression: SuppressionSettings = Field(default_factory=SuppressionSettings)

    @property
    def pending_card_max_age(self) -> timedelta:
        return timedelta(hours=self.pending_card_max_age_hours)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The --config file arrives as an init value of its own (see load_settings), read here so that the
        # order stays flags, then environment, then file.
        config_file = init_settings.init_kwargs.pop("config_file", None)  # type: ignore[attr-defined]
        return (init_settings, env_settings, _YamlSource(settings_cls, config_file))


class _YamlSource(PydanticBaseSettingsSource):
    """The --config YAML file: a mapping of the same settings."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path | None) -> None:
        super().__init__(settings_cls)
        self.path = path

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        if self.path is None:
            return {}
        from ruamel.yaml import YAML
        from ruamel.yaml.error import YAMLError

        from .errors import ConfigError

        try:
            data = YAML(typ="safe").load(self.path.read_text(encoding="utf-8")) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read the configuration file {self.path}: {exc.strerror} (copy "
                              "config.example.yaml to start one)") from None
        except YAMLError as exc:
            raise ConfigError(f"{self.path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{self.path}: the configuration file must be a YAML mapping")
        return data


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build settings; `overrides` are command-line flags (None means "not given")."""
    from pydantic import ValidationError

    from .errors import ConfigError

    values = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(config_file=config_file, **values)  # type: ignore[call-arg]  # read by the YAML source
    except ValidationError as exc:
        raise ConfigError("; ".join(_setting_problem(e) for e in exc.errors())) from None


def _setting_problem(error: Any) -> str:
    """A settings error in the words of the configuration: the setting's name, and the closest known one."""
    from .rules.resources import did_you_mean

    where = ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":
        known: set[str] = set(Settings.model_fields)
        if len(error["loc"]) > 1 and error["loc"][0] == "auth":
            known = set(AuthSettings.model_fields)
        return f"unknown setting '{where}'{did_you_mean(str(error['loc'][-1]), known)}"
    return f"setting '{where}': {error['msg']}"
