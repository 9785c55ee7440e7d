"""Query-string and settings forms: bad input becomes a message on the page, never a 500."""

from __future__ import annotations

from datetime import timedelta

from django import forms
from django.conf import settings
from django.utils import timezone

from ingest.models import Project
from ingest.selectors.spans import FLAG_CHOICES, SORTS

RANGES = {"1h": timedelta(hours=1), "24h": timedelta(hours=24), "7d": timedelta(days=7), "30d": timedelta(days=30)}
DEFAULT_RANGE = "7d"


class _NoNul(forms.CharField):
    def clean(self, value):
        value = super().clean(value)
        if value and "\x00" in value:
            raise forms.ValidationError("NUL characters are not allowed")
        return value or None


class RangeForm(forms.Form):
    range = forms.ChoiceField(choices=[(k, k) for k in RANGES] + [("custom", "custom")], required=False)
    start = forms.DateTimeField(required=False, label="from")
    end = forms.DateTimeField(required=False, label="to")

    def window(self):
        """(start, end) as aware datetimes; the default range when the form is invalid."""
        now = timezone.now()
        data = self.cleaned_data if self.is_valid() else {}
        start, end = data.get("start"), data.get("end")
        if data.get("range") == "custom" or (not data.get("range") and (start or end)):
            end = end or now
            start = start or end - RANGES[DEFAULT_RANGE]
            if start >= end:
                start = end - timedelta(hours=1)
            return start, end
        return now - RANGES[data.get("range") or DEFAULT_RANGE], now

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
    user = _NoNul(required=False, max_length=200)
    session = _NoNul(required=False, max_length=200)
    trace = _NoNul(required=False, max_length=128)
    flag = forms.ChoiceField(choices=[("", "any")] + [(f, f) for f in FLAG_CHOICES], required=False)
    q = _NoNul(required=False, max_length=500, label="prompt contains")
    sort = forms.ChoiceField(choices=[(s, s) for s in SORTS], required=False)
    page = forms.IntegerField(required=False, min_value=1, max_value=10_000)


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
