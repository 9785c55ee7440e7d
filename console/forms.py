"""Query-string and settings forms: bad input becomes a message on the page, never a 500."""

from __future__ import annotations

from datetime import datetime, timedelta
from datetime import timezone as dt_timezone

from django import forms
from django.conf import settings
from django.utils import timezone

from ingest.kinds import SPAN_KINDS
from ingest.models import Project
from ingest.selectors.spans import FLAG_CHOICES, MISSING_FIELDS, SORTS

RANGES = {"1h": timedelta(hours=1), "24h": timedelta(hours=24), "7d": timedelta(days=7), "30d": timedelta(days=30)}
DEFAULT_RANGE = "7d"
# How a page names a preset range: the explorer's "1h" is the last 60 minutes to the second.
RANGE_WORDS = {"1h": "60 minutes", "24h": "24 hours", "7d": "7 days", "30d": "30 days"}


class _NoNul(forms.CharField):
    def clean(self, value):
        value = super().clean(value)
        if value and "\x00" in value:
            raise forms.ValidationError("NUL characters are not allowed")
        return value or None


class _UtcDateTime(forms.DateTimeField):
    """A date-time as aware UTC; one whose UTC time is outside the years 1-9999 is invalid, not a 500."""

    def to_python(self, value):
        value = super().to_python(value)
        if value is None:
            return None
        try:
            return value.astimezone(dt_timezone.utc)
        except OverflowError:
            raise forms.ValidationError("that date is outside the years 1 to 9999 in UTC") from None


class RangeForm(forms.Form):
    """A preset range or a custom one, always inside `bounds` (the project's data window).

    Custom ranges are clamped there: one from the year 1 would read every partition and draw
    hundreds of thousands of points. What was changed is explained in `notes`.
    """

    range = forms.ChoiceField(choices=[(k, k) for k in RANGES] + [("custom", "custom")], required=False)
    start = _UtcDateTime(required=False, label="from")
    end = _UtcDateTime(required=False, label="to")

    def __init__(self, *args, bounds: tuple[datetime, datetime], **kwargs):
        super().__init__(*args, **kwargs)
        self.bounds = bounds
        self.notes: list[str] = []

    def window(self):
        """(start, end) as aware datetimes; the default range when the form is invalid."""
        earliest, latest = self.bounds
        now = min(timezone.now(), latest)
        data = self.cleaned_data if self.is_valid() else {}
        start, end = data.get("start"), data.get("end")
        if not (data.get("range") == "custom" or (not data.get("range") and (start or end))):
            return max(now - RANGES[data.get("range") or DEFAULT_RANGE], earliest), now
        self.notes = []
        end = min(max(end or now, earliest), latest)
        clamped = bool(data.get("end")) and end != data["end"]
        start = start or end - RANGES[DEFAULT_RANGE]
        clamped |= bool(data.get("start")) and not earliest <= start <= latest
        start = min(max(start, earliest), latest)
        if start >= end:
            if end - timedelta(hours=1) >= earliest:
                start = end - timedelta(hours=1)
            else:
                end = start + timedelta(hours=1)
        if clamped:
            self.notes.append(f"Ranges stay within the data this project keeps ({earliest:%Y-%m-%d %H:%M} UTC, "
                              f"the retention cut-off, to {latest:%Y-%m-%d %H:%M} UTC): showing "
                              f"{start:%Y-%m-%d %H:%M} – {end:%Y-%m-%d %H:%M} UTC.")
        return start, end

    def range_key(self) -> str:
        if self.is_valid():
            if self.cleaned_data.get("range"):
                return self.cleaned_data["range"]
            if self.cleaned_data.get("start") or self.cleaned_data.get("end"):
                return "custom"
        return DEFAULT_RANGE


class ExplorerForm(RangeForm):
    service = _NoNul(required=False, max_length=200)
    model = _NoNul(required=False, max_length=200)
    provider = _NoNul(required=False, max_length=64)
    status = forms.ChoiceField(choices=[("", "any"), ("success", "success"), ("error", "error")], required=False)
    kind = forms.ChoiceField(choices=[("", "any")] + [(k, k.lower()) for k in SPAN_KINDS], required=False)
    user = _NoNul(required=False, max_length=200)
    session = _NoNul(required=False, max_length=200)
    trace = _NoNul(required=False, max_length=128)
    flag = forms.ChoiceField(choices=[("", "any")] + [(f, f) for f in FLAG_CHOICES], required=False)
    q = _NoNul(required=False, max_length=500, label="prompt contains")
    sort = forms.ChoiceField(choices=[(s, s) for s in SORTS], required=False)
    page = forms.IntegerField(required=False, min_value=1, max_value=10_000)
    # ?missing=model: spans without a model (the overview's "(none)" rows); comma-separated names.
    missing = forms.CharField(required=False, max_length=100)
    # ?calls=1: only what the overview's roll-ups count (model calls, no duplicates).
    calls = forms.BooleanField(required=False)

    def __init__(self, data=None, *args, **kwargs):
        if data is not None and data.get("kind"):
            data = data.copy()  # ?kind=tool is ?kind=TOOL, and the menu shows it chosen
            data["kind"] = data["kind"].strip().upper()
        super().__init__(data, *args, **kwargs)

    def clean_missing(self) -> tuple[str, ...]:
        names = [n.strip() for n in (self.cleaned_data.get("missing") or "").split(",") if n.strip()]
        params = {MISSING_PARAMS.get(n, n) for n in names}
        unknown = sorted(params - set(MISSING_FIELDS))
        if unknown:
            raise forms.ValidationError(f"only {', '.join(MISSING_PARAMS)} can be asked to be empty")
        return tuple(sorted(params))

    def clean(self):
        data = super().clean()
        # A value chosen in a menu wins over "(none)" of the same field: both cannot hold.
        data["missing"] = tuple(n for n in data.get("missing") or () if not data.get(SPAN_FILTER_PARAMS[n]))
        return data


# The explorer's parameter for each SpanFilters field that can be asked to be empty.
MISSING_PARAMS = {"service": "service", "model": "model", "provider": "provider", "user": "user_id",
                  "session": "session_id"}
SPAN_FILTER_PARAMS = {field: param for param, field in MISSING_PARAMS.items()}


class SimilarForm(RangeForm):
    text = _NoNul(required=False, max_length=10_000, widget=forms.Textarea(attrs={"rows": 3}))
    span = _NoNul(required=False, max_length=128)
    service = _NoNul(required=False, max_length=200)
    k = forms.IntegerField(required=False, min_value=1, max_value=100, initial=10)


class ProjectCreateForm(forms.Form):
    name = forms.SlugField(max_length=100, help_text="lower-case letters, digits and dashes")

    def clean_name(self):
        name = self.cleaned_data["name"].lower()
        if Project.objects.filter(name=name).exists():
            raise forms.ValidationError("a project with this name exists")
        return name


class ProjectSettingsForm(forms.ModelForm):
    class Meta:
        model = Project
        fields = ["sampling_rate", "redaction_mode", "retention_days"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        days = settings.RETENTION_DAYS
        self.fields["retention_days"].help_text = f"empty = the appliance's {days} days; 1 to {days}"
        self.fields["sampling_rate"].help_text = ("percent of spans that get a prompt hash and an embedding "
                                                  "(similarity search); empty = the default 1 % rule")


class KeyCreateForm(forms.Form):
    name = forms.CharField(max_length=100, initial="default")
    nonce = forms.CharField(max_length=64, widget=forms.HiddenInput)
