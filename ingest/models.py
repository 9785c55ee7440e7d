from __future__ import annotations

import re
from decimal import Decimal

from django.conf import settings
from django.core.exceptions import ValidationError
from django.contrib.postgres.fields import ArrayField
from django.db import models
from django.utils import timezone
from pgvector.django import HalfVectorField, HnswIndex, VectorField


class Project(models.Model):
    class Redaction(models.TextChoices):
        PLACEHOLDER = "placeholder", "Replace each match with a typed placeholder"
        DROP = "drop", "Drop the whole text"

    name = models.SlugField(max_length=100, unique=True)
    created_at = models.DateTimeField(default=timezone.now)
    members = models.ManyToManyField(settings.AUTH_USER_MODEL, blank=True, related_name="llm_projects")
    # None: the seed's rule (sha256(span_id) % 100 == 0, about 1 %).
    sampling_rate = models.FloatField(null=True, blank=True, help_text="0-100 %; empty = default 1 % rule")
    redaction_mode = models.CharField(
        max_length=16, choices=Redaction.choices, default=Redaction.PLACEHOLDER,
        help_text="what happens to a prompt or response in which PII was found",
    )
    retention_days = models.PositiveIntegerField(null=True, blank=True, help_text="empty = RETENTION_DAYS")

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        errors = {}
        if self.sampling_rate is not None and not 0 <= self.sampling_rate <= 100:
            errors["sampling_rate"] = "must be between 0 and 100"
        if self.retention_days is not None and not 1 <= self.retention_days <= settings.RETENTION_DAYS:
            errors["retention_days"] = f"must be between 1 and RETENTION_DAYS ({settings.RETENTION_DAYS})"
        if errors:
            raise ValidationError(errors)


class ApiKey(models.Model):
    """An ingestion key. Only a SHA-256 of the key is stored; the key is shown once."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100, default="default")
    prefix = models.CharField(max_length=16, unique=True, editable=False)
    key_hash = models.CharField(max_length=64, editable=False)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.project.name}/{self.name} ({self.prefix}…)"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None


class ModelPrice(models.Model):
    """USD per 1M tokens for one provider + model; `model` matches normalised names."""

    class Source(models.TextChoices):
        CONFIG = "config", "config/model_prices.yaml"
        ADMIN = "admin", "edited in the admin"

    provider = models.CharField(max_length=64)
    model = models.CharField(max_length=200, help_text="normalised model name, e.g. gpt-4o or claude-sonnet-4")
    input_price_per_1m = models.DecimalField(max_digits=14, decimal_places=6)
    output_price_per_1m = models.DecimalField(max_digits=14, decimal_places=6)
    cached_input_price_per_1m = models.DecimalField(max_digits=14, decimal_places=6, null=True, blank=True)
    version = models.CharField(max_length=32, help_text="price version, e.g. the date of the price page")
    effective_date = models.DateField(null=True, blank=True)
    source = models.CharField(max_length=8, choices=Source.choices, default=Source.ADMIN)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["provider", "model"]
        constraints = [
            models.UniqueConstraint(fields=["provider", "model"], name="modelprice_unique_provider_model"),
            models.CheckConstraint(
                condition=models.Q(input_price_per_1m__gte=0)
                & models.Q(output_price_per_1m__gte=0)
                & (models.Q(cached_input_price_per_1m__isnull=True) | models.Q(cached_input_price_per_1m__gte=0)),
                name="modelprice_prices_not_negative",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.provider}/{self.model} ({self.version})"

    def clean(self) -> None:
        errors = {}
        for field in ("input_price_per_1m", "output_price_per_1m", "cached_input_price_per_1m"):
            value = getattr(self, field)
            # NaN/inf were already refused by the field; comparing them would raise.
            if isinstance(value, Decimal) and value.is_finite() and value < 0:
                errors[field] = "prices cannot be negative"
        if errors:
            raise ValidationError(errors)
        self.provider = self.provider.strip().lower()
        self.model = self.model.strip().lower()


class DetectionPattern(models.Model):
    class Kind(models.TextChoices):
        PII_STRUCTURAL = "PII_STRUCTURAL", "PII (redacted before storage)"
        INJECTION_ATTEMPT = "INJECTION_ATTEMPT", "Prompt injection (flagged)"

    name = models.CharField(max_length=100, unique=True)
    type = models.CharField(max_length=20, choices=Kind.choices)
    regex = models.TextField(blank=True, help_text="Python regular expression (case-insensitive)")
    phrases = models.JSONField(default=list, blank=True, help_text="list of literal phrases, matched case-insensitively")
    validator = models.CharField(
        max_length=32, blank=True,
        help_text="extra check on regex matches: luhn, card, iban, aba, ipv4, phone, phonenumber or phonenumber_any")
    anchors = models.JSONField(
        default=list, blank=True,
        help_text='literals every match has nearby, e.g. ["@"]; the regex then runs only around them. '
        '"<digits>" = near a run of digits. Empty: the regex runs on the whole text (correct, slower).',
    )
    placeholder = models.CharField(max_length=40, blank=True, help_text="redaction label, e.g. EMAIL")
    context = models.JSONField(
        default=list, blank=True,
        help_text='words of which one must occur within "context window" characters of a match for it to count, '
        'e.g. ["ssn", "social security"] for an SSN without dashes. Empty: no such condition.',
    )
    exclude_context = models.JSONField(
        default=list, blank=True,
        help_text='words of which none may occur within "context window" characters of a match, '
        "e.g. ['\"role\"'] so a framework's own message JSON is not taken for a smuggled tool call.",
    )
    context_window = models.PositiveIntegerField(
        default=0, blank=True, help_text="characters searched either side of a match for context words (0: 40)")
    enabled = models.BooleanField(default=True)
    description = models.TextField(blank=True)
    source = models.CharField(max_length=8, choices=ModelPrice.Source.choices, default=ModelPrice.Source.ADMIN)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["type", "name"]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        errors = {}
        if self.regex:
            try:
                re.compile(self.regex)
            except re.error as exc:
                errors["regex"] = f"does not compile: {exc}"
        if not isinstance(self.phrases, list) or not all(isinstance(p, str) and p.strip() for p in self.phrases):
            errors["phrases"] = "must be a list of non-empty strings"
        if not isinstance(self.anchors, list) or not all(isinstance(a, str) and a for a in self.anchors):
            errors["anchors"] = "must be a list of non-empty strings"
        if self.context_window is None:  # a cleared admin field means the default
            self.context_window = 0
        for name in ("context", "exclude_context"):
            words = getattr(self, name)
            if not isinstance(words, list) or not all(isinstance(w, str) and w.strip() for w in words):
                errors[name] = "must be a list of non-empty strings"
        from instrumentation_sdk.scanning import VALIDATORS

        if self.validator and self.validator not in VALIDATORS:
            errors["validator"] = f"unknown validator; one of {', '.join(sorted(VALIDATORS))}"
        if not self.regex and not self.phrases:
            errors["regex"] = "give a regex or at least one phrase"
        if (self.context or self.exclude_context) and not self.regex:
            errors["context"] = "context words apply to regex matches: give a regex"
        if errors:
            raise ValidationError(errors)

    def spec(self):
        """The scanning engine's view of this row."""
        from instrumentation_sdk.scanning import PatternSpec

        return PatternSpec(name=self.name, type=self.type, regex=self.regex, phrases=tuple(self.phrases),
                           validator=self.validator, placeholder=self.placeholder, anchors=tuple(self.anchors),
                           context=tuple(self.context or ()), exclude_context=tuple(self.exclude_context or ()),
                           context_window=self.context_window or 0)


class Span(models.Model):
    """One LLM call. The table is RANGE-partitioned by day on timestamp_utc (see migration 0001).

    Django knows the table only for reads; writes go through services.spans
    (COPY into a staging table, then a deduplicating insert).
    """

    pk = models.CompositePrimaryKey("project_id", "timestamp_utc", "span_id")
    project = models.ForeignKey(Project, on_delete=models.DO_NOTHING, db_constraint=False, related_name="+")
    span_id = models.CharField(max_length=128)
    timestamp_utc = models.DateTimeField()
    trace_id = models.CharField(max_length=128)
    parent_span_id = models.CharField(max_length=128, null=True)
    schema_version = models.SmallIntegerField(default=1)
    model = models.CharField(max_length=200, null=True)
    provider = models.CharField(max_length=64, null=True)
    service_name = models.CharField(max_length=200, null=True)
    endpoint = models.CharField(max_length=500, null=True)
    environment = models.CharField(max_length=64, null=True)
    user_id = models.CharField(max_length=200, null=True)
    session_id = models.CharField(max_length=200, null=True)
    status = models.CharField(max_length=16)
    finish_reason = models.CharField(max_length=32, null=True)
    prompt_tokens = models.IntegerField(null=True)
    completion_tokens = models.IntegerField(null=True)
    cached_tokens = models.IntegerField(null=True)
    reasoning_tokens = models.IntegerField(null=True)
    token_count_method = models.CharField(max_length=16, null=True)
    latency_ms_ttft = models.FloatField(null=True)
    latency_ms_total = models.FloatField(null=True)
    cost_usd_micro = models.BigIntegerField(null=True)
    price_version = models.CharField(max_length=32, null=True)
    is_sampled = models.BooleanField(default=False)
    retry_count = models.IntegerField(default=0)
    attempted_models = models.JSONField(null=True)
    pii_detected = models.BooleanField(default=False)
    injection_attempt = models.BooleanField(default=False)
    matched_patterns = models.JSONField(null=True)
    # ok: scanned; error: the scanner failed (stored as sent, see logs); None: not scanned
    scan_status = models.CharField(max_length=8, null=True)
    prompt = models.TextField(null=True)
    response = models.TextField(null=True)
    prompt_hash = models.CharField(max_length=64, null=True)
    error_type = models.CharField(max_length=200, null=True)
    error_message = models.TextField(null=True)
    metadata = models.JSONField(null=True)
    received_at = models.DateTimeField()
    name = models.CharField(max_length=500, null=True)
    kind = models.CharField(max_length=16, null=True)  # ingest.schemas.SPAN_KINDS
    response_id = models.CharField(max_length=200, null=True)
    duplicate_of = models.CharField(max_length=128, null=True)

    class Meta:
        managed = False
        db_table = "ingest_span"


class SpanKey(models.Model):
    """Global (project, span_id) uniqueness that the partitioned table cannot enforce alone.

    The span's primary key must include the partition column, so a re-sent span
    with a different timestamp would slip through; this small table catches it.
    """

    pk = models.CompositePrimaryKey("project_id", "span_id")
    project = models.ForeignKey(Project, on_delete=models.DO_NOTHING, db_constraint=False, related_name="+")
    span_id = models.CharField(max_length=128)
    timestamp_utc = models.DateTimeField(db_index=True)


class Embedding(models.Model):
    """One MiniLM vector per distinct prompt of a project (content_key = the spans' prompt_hash).

    One HNSW graph over all of time: what a search over a wide window (over
    SEARCH_DAY_GRAPHS_MAX_DAYS) walks; its time, service and model filters are applied on the
    spans. Narrow windows use EmbeddingDay. This table is also where a prompt is embedded once.
    """

    pk = models.CompositePrimaryKey("project_id", "content_key")
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="+")
    content_key = models.CharField(max_length=64)
    embedding = VectorField(dimensions=384)
    model_name = models.CharField(max_length=100)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [
            HnswIndex(name="ingest_embedding_hnsw", fields=["embedding"], m=24, ef_construction=128,
                      opclasses=["vector_cosine_ops"]),
        ]


class EmbeddingDay(models.Model):
    """A copy of a prompt's vector for each day, service, model and provider it was seen in.

    RANGE-partitioned by `day` like the spans (migration 0007), each partition with its own
    HNSW graph: a search over a narrow window (a few days) walks only those days' graphs, and
    its service/model/provider filters are columns of the rows the graphs return. With the one
    global graph, one service over the last 24 h (under 1 % of the vectors) had too few matches
    along the walk. Rows are only inserted, never updated (an update would be a new graph entry).
    Unmanaged: writes go through services.embeddings.
    """

    pk = models.CompositePrimaryKey("project_id", "day", "content_key", "service_name", "model", "provider")
    project_id = models.BigIntegerField()
    day = models.DateField()
    content_key = models.CharField(max_length=64)
    service_name = models.CharField(max_length=200, default="")
    model = models.CharField(max_length=200, default="")
    provider = models.CharField(max_length=64, default="")
    # Half precision (migration 0009): the copies and their graphs take half the room of the
    # global fp32 vectors; the final score of a search is still computed from those.
    embedding = HalfVectorField(dimensions=384)

    class Meta:
        managed = False
        db_table = "ingest_embeddingday"


class EmbeddingFacet(models.Model):
    """A service, model and provider an embedded prompt was seen with (migration 0008).

    Lets a walk of the global graph reject neighbours of other services with one index probe;
    the spans still decide exactly. Deleted with the prompt's global vector (a trigger, migration 0008).
    Unmanaged: written by services.embeddings.
    """

    pk = models.CompositePrimaryKey("project_id", "content_key", "service_name", "model", "provider")
    project_id = models.BigIntegerField()
    content_key = models.CharField(max_length=64)
    service_name = models.CharField(max_length=200, default="")
    model = models.CharField(max_length=200, default="")
    provider = models.CharField(max_length=64, default="")

    class Meta:
        managed = False
        db_table = "ingest_embeddingfacet"


class SpanRollup(models.Model):
    """Hourly sums of spans per service/model/provider, written in the ingest transaction.

    `shard` spreads concurrent writers of the same hour over a few rows, so ingest
    batches do not queue behind each other's row locks; readers sum over it.
    """

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="+")
    hour = models.DateTimeField()
    service_name = models.CharField(max_length=200, default="")
    model = models.CharField(max_length=200, default="")
    provider = models.CharField(max_length=64, default="")
    shard = models.SmallIntegerField(default=0)
    spans = models.BigIntegerField(default=0)
    errors = models.BigIntegerField(default=0)
    prompt_tokens = models.BigIntegerField(default=0)
    completion_tokens = models.BigIntegerField(default=0)
    cost_usd_micro = models.BigIntegerField(default=0)
    latency_ms_sum = models.FloatField(default=0)
    latency_count = models.BigIntegerField(default=0)
    pii = models.BigIntegerField(default=0)
    injections = models.BigIntegerField(default=0)

    class Meta:
        constraints = [models.UniqueConstraint(
            fields=["project", "hour", "service_name", "model", "provider", "shard"], name="spanrollup_key")]


class LatencyRollup(models.Model):
    """Hourly latency and TTFT histograms (log buckets, see services/rollups.py) of a project."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="+")
    hour = models.DateTimeField()
    shard = models.SmallIntegerField(default=0)
    latency = ArrayField(models.BigIntegerField())
    ttft = ArrayField(models.BigIntegerField())

    class Meta:
        constraints = [models.UniqueConstraint(fields=["project", "hour", "shard"], name="latencyrollup_key")]


class UserRollup(models.Model):
    """Daily spans and cost per end user (top users by cost)."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="+")
    day = models.DateField()
    user_id = models.CharField(max_length=200)
    spans = models.BigIntegerField(default=0)
    cost_usd_micro = models.BigIntegerField(default=0)
    prompt_tokens = models.BigIntegerField(default=0)
    completion_tokens = models.BigIntegerField(default=0)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["project", "day", "user_id"], name="userrollup_key")]


class PendingContent(models.Model):
    """GenAI text from OTLP logs (/v1/logs) whose span has not been stored yet (services.span_content).

    Scanned and redacted before it is written here, like a span's prompt. Applied and deleted when
    the span lands (in the spans' insert transaction); rows past `expires_at`
    (OTLP_LOG_PENDING_SECONDS) are deleted by the beat, and a project keeps at most
    OTLP_LOG_PENDING_MAX_ROWS of them (the oldest go first).
    """

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="+", db_index=False)
    trace_id = models.CharField(max_length=128)
    span_id = models.CharField(max_length=128)
    prompt = models.TextField(null=True)
    prompt_pii = models.BooleanField(default=False)
    prompt_injection = models.BooleanField(default=False)
    prompt_patterns = models.JSONField(null=True)
    response = models.TextField(null=True)
    response_pii = models.BooleanField(default=False)
    response_injection = models.BooleanField(default=False)
    response_patterns = models.JSONField(null=True)
    scan_status = models.CharField(max_length=8, null=True)
    events = models.PositiveIntegerField(default=1, help_text="log records merged into this row")
    finish_reason = models.CharField(max_length=32, null=True)  # of the choice event, for a span that has none
    received_at = models.DateTimeField()
    expires_at = models.DateTimeField(db_index=True)

    class Meta:
        indexes = [
            models.Index(fields=["project", "span_id"], name="pendingcontent_span"),
            models.Index(fields=["project", "id"], name="pendingcontent_age"),
        ]


class ScoreConfig(models.Model):
    """What a score name means in a project: its type (fixed per name), range or categories, description.

    A name without a config takes numbers (numeric) and true/false (boolean); categories need one.
    """

    class DataType(models.TextChoices):
        NUMERIC = "numeric", "Numeric"
        BOOLEAN = "boolean", "Boolean"
        CATEGORICAL = "categorical", "Categorical"

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="score_configs")
    name = models.CharField(max_length=200)
    data_type = models.CharField(max_length=12, choices=DataType.choices, default=DataType.NUMERIC)
    min_value = models.FloatField(null=True, blank=True, help_text="numeric only; empty = no lower bound")
    max_value = models.FloatField(null=True, blank=True, help_text="numeric only; empty = no upper bound")
    categories = models.JSONField(default=list, blank=True, help_text='categorical only, e.g. ["good", "bad"]')
    description = models.TextField(blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["project", "name"]
        constraints = [models.UniqueConstraint(fields=["project", "name"], name="scoreconfig_unique_name")]

    def __str__(self) -> str:
        return f"{self.project}/{self.name} ({self.data_type})"

    def clean(self) -> None:
        import math

        errors = {}
        for bound in ("min_value", "max_value"):
            value = getattr(self, bound)
            if value is not None and not math.isfinite(value):
                errors[bound] = "must be a finite number"
        if self.min_value is not None and self.max_value is not None and self.min_value > self.max_value:
            errors["max_value"] = "must not be below min_value"
        cats = self.categories
        if not isinstance(cats, list) or not all(isinstance(c, str) and c.strip() and len(c) <= 200 for c in cats):
            errors["categories"] = "must be a list of non-empty strings (200 characters at most)"
        elif len(set(cats)) != len(cats):
            errors["categories"] = "must not repeat a category"
        elif self.data_type == self.DataType.CATEGORICAL and not cats:
            errors["categories"] = "a categorical score needs at least one category"
        if self.data_type != self.DataType.NUMERIC and (self.min_value is not None or self.max_value is not None):
            errors["min_value"] = "only numeric scores have a range"
        if self.data_type != self.DataType.CATEGORICAL and cats:
            errors["categories"] = "only categorical scores have categories"
        if errors:
            raise ValidationError(errors)


class Score(models.Model):
    """A judgement of a span, trace or session: user feedback, an annotation, an evaluator's result.

    The target is by id strings, not foreign keys: a score may arrive before its span (the SDK
    sends feedback while the span is still queued) and is found by the same ids once it lands.
    A plain table (not partitioned like spans): retention deletes by `created_at` in batches
    (services.scores.scores_delete_expired); indexes serve the list API and trace/span lookups.
    """

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="+", db_index=False)
    score_id = models.CharField(max_length=128, help_text="the client's idempotency id, or one made at ingest")
    name = models.CharField(max_length=200)
    data_type = models.CharField(max_length=12, choices=ScoreConfig.DataType.choices)
    value = models.FloatField(help_text="the number; 1/0 for boolean; the category's index for categorical")
    string_value = models.CharField(max_length=200, null=True, help_text="the category, or true/false")
    comment = models.TextField(null=True)
    comment_pii = models.BooleanField(default=False)
    source = models.CharField(max_length=12)  # api, sdk, annotation, evaluator
    author = models.CharField(max_length=200, null=True)  # key:<prefix> or user:<username>
    trace_id = models.CharField(max_length=128, null=True)
    span_id = models.CharField(max_length=128, null=True)
    session_id = models.CharField(max_length=200, null=True)
    created_at = models.DateTimeField()
    received_at = models.DateTimeField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["project", "score_id"], name="score_unique_id")]
        indexes = [
            models.Index(fields=["project", "-created_at", "-score_id"], name="score_recent"),
            models.Index(fields=["project", "trace_id"], name="score_trace"),
            models.Index(fields=["project", "span_id"], name="score_span"),
            models.Index(fields=["project", "session_id"], name="score_session"),
            models.Index(fields=["project", "name", "-created_at"], name="score_name_recent"),
        ]
