"""Console pages: presentation only. Reads go through ingest selectors, writes through ingest services.

Every page needs a login; a project the user is not a member of is a 404 (staff see all).
"""

from __future__ import annotations

import secrets
from datetime import datetime, time, timedelta
from datetime import timezone as dt_timezone
from urllib.parse import urlencode

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.http import Http404
from django.shortcuts import redirect, render
from django.utils import timezone
from django.utils.cache import add_never_cache_headers
from django.views.decorators.http import require_POST

from console.forms import (RANGE_WORDS, SPAN_FILTER_PARAMS, ExplorerForm, KeyCreateForm, ProjectCreateForm, ProjectSettingsForm,
                           RangeForm, SimilarForm)
from console.templatetags.console_tags import span_url, trace_url
from ingest.selectors.overview import overview_get
from ingest.schemas import MAX_ID
from ingest.selectors.projects import (project_data_window, project_for_user, project_keys, project_summaries,
                                       projects_for_user)
from ingest.selectors.search import SearchError, search_similar
from ingest.selectors.security import security_overview
from ingest.selectors.spans import SpanFilters, span_explore, span_facets, span_get, trace_get
from ingest.services.api_keys import api_key_create, api_key_revoke
from ingest.services.projects import project_create, project_update_settings

# One-time tokens of the key form (never the keys): a re-sent POST (a refresh) makes no second key.
_KEY_NONCES = "console_key_nonces"
_KEY_NONCES_KEPT = 20


def _project(request, name: str):
    project = project_for_user(user=request.user, name=name)
    if project is None:
        raise Http404("no such project")
    return project


def _context(request, project, **extra) -> dict:
    return {"project": project, "projects": projects_for_user(user=request.user),
            "base_url": request.build_absolute_uri("/").rstrip("/"), **extra}


def _id_param(request, name: str) -> str:
    """An id from the query string; one that no span can have (empty, too long, NUL) is a 404."""
    value = request.GET.get(name, "")
    if not value or len(value) > MAX_ID or "\x00" in value:
        raise Http404(f"no such {name}")
    return value


def _range_query(form: RangeForm) -> str:
    if not form.is_valid():
        return ""
    keep = {k: form.data[k] for k in ("range", "start", "end") if form.data.get(k)}
    return urlencode(keep)


def _window_query(start: datetime, end: datetime) -> str:
    """The explorer's query for exactly [start, end); without an end (up to now) when end is about now.

    The overview and the security page link to the explorer with the window they really show
    (whole hours for the roll-ups), not with their range key: the explorer's "1h" is the last 60
    minutes to the second, and the counts would not match.
    """
    def fmt(t: datetime) -> str:
        return f"{t:%Y-%m-%dT%H:%M:%S}" if t.second or t.microsecond else f"{t:%Y-%m-%dT%H:%M}"

    params = {"range": "custom", "start": fmt(start)}
    if end < timezone.now() - timedelta(minutes=1):
        params["end"] = fmt(end)
    return urlencode(params)


def _ranged(request, project) -> tuple[datetime, datetime, dict]:
    """The page's time window and what the range picker needs in the template."""
    form = RangeForm(request.GET, bounds=project_data_window(project=project))
    start, end = form.window()
    return start, end, {"form": form, "range_key": form.range_key(), "range_query": _range_query(form),
                        "start": start, "end": end}


@login_required
def home(request):
    projects = project_summaries(user=request.user)
    if len(projects) == 1:
        return redirect("console:overview", project=projects[0]["project"].name)
    return render(request, "console/home.html", {"summaries": projects, "projects": [p["project"] for p in projects],
                                                 "create_form": ProjectCreateForm() if request.user.is_staff else None})


@login_required
def overview(request, project: str):
    project = _project(request, project)
    start, end, picker = _ranged(request, project)
    data = overview_get(project_id=project.id, start=start, end=end)
    first_day, last_day = (datetime.combine(day, time.min, tzinfo=dt_timezone.utc) for day in data["days"])
    return render(request, "console/overview.html", _context(
        request, project, **picker, data=data, range_words=RANGE_WORDS.get(picker["range_key"]),
        window_query=_window_query(data["start"], data["window_end"]),
        days_query=_window_query(first_day, min(last_day + timedelta(days=1), data["window_end"])),
        keys=project_keys(project=project) if not data["totals"]["spans"] else None))


@login_required
def explorer(request, project: str):
    project = _project(request, project)
    form = ExplorerForm(request.GET, bounds=project_data_window(project=project))
    start, end = form.window()
    data = form.cleaned_data if form.is_valid() else {}
    filters = SpanFilters(start=start, end=end, service=data.get("service"), model=data.get("model"),
                          provider=data.get("provider"), status=data.get("status") or None,
                          trace_id=data.get("trace"), user_id=data.get("user"), session_id=data.get("session"),
                          kind=data.get("kind") or None, flag=data.get("flag") or None, text=data.get("q"),
                          missing=data.get("missing") or (), calls_only=bool(data.get("calls")))
    sort = data.get("sort") or "time"
    page = span_explore(project_id=project.id, filters=filters, sort=sort, page=data.get("page") or 1)
    params = {k: v for k, v in request.GET.items() if k != "page" and v}
    return render(request, "console/explorer.html", _context(
        request, project, form=form, page=page, sort=sort, range_key=form.range_key(),
        start=start, end=end, range_words=RANGE_WORDS.get(form.range_key()),
        missing=[(SPAN_FILTER_PARAMS[name], ",".join(SPAN_FILTER_PARAMS[n] for n in filters.missing if n != name))
                 for name in filters.missing], calls_only=filters.calls_only,
        facets=span_facets(project_id=project.id, since=timezone.now() - timedelta(days=30)),
        query_without_page=urlencode(params),
        query_without_sort=urlencode({k: v for k, v in params.items() if k != "sort"})))


@login_required
def span_detail(request, project: str):
    project = _project(request, project)
    span_id = _id_param(request, "id")
    span = span_get(project_id=project.id, span_id=span_id)
    if span is None:
        raise Http404("no such span")
    return redirect(trace_url(project.name, span["trace_id"], span_id))


@login_required
def span_by_path(request, project: str, span_id: str):
    """A bookmark of the former /spans/<id>/ URL."""
    return redirect(span_url(project, span_id))


@login_required
def trace_by_path(request, project: str, trace_id: str):
    """A bookmark of the former /traces/<id>/?span=<id> URL."""
    return redirect(trace_url(project, trace_id, request.GET.get("span")))


def _flatten(nodes, depth=0, out=None):
    out = [] if out is None else out
    for node in nodes:
        out.append((depth, node))
        _flatten(node["children"], depth + 1, out)
    return out


@login_required
def trace(request, project: str):
    project = _project(request, project)
    trace_id = _id_param(request, "id")
    tree = trace_get(project_id=project.id, trace_id=trace_id)
    if tree is None:
        raise Http404("no such trace")
    rows = _flatten(tree["roots"])
    begin = min(node["timestamp_utc"] for _, node in rows)
    finish = max(node["timestamp_utc"] + timedelta(milliseconds=node["latency_ms_total"] or 0) for _, node in rows)
    total_ms = max((finish - begin).total_seconds() * 1000, 1.0)
    spans = []
    for depth, node in rows:
        offset = (node["timestamp_utc"] - begin).total_seconds() * 1000
        spans.append({**node, "depth": depth,
                      "bar_left": 100 * offset / total_ms,
                      "bar_width": max(100 * (node["latency_ms_total"] or 0) / total_ms, 0.5)})
    selected_id = request.GET.get("span") or spans[0]["span_id"]
    selected = next((s for s in spans if s["span_id"] == selected_id), spans[0])
    return render(request, "console/trace.html", _context(
        request, project, trace_id=trace_id, spans=spans, selected=selected, total_ms=total_ms, begin=begin))


@login_required
def security(request, project: str):
    project = _project(request, project)
    start, end, picker = _ranged(request, project)
    data = security_overview(project_id=project.id, start=start, end=end)
    first = data["start"]
    recent = span_explore(project_id=project.id, filters=SpanFilters(start=first, end=end, flag="flagged"),
                          per_page=25)
    return render(request, "console/security.html", _context(
        request, project, **picker, data=data, recent=recent, window_query=_window_query(first, end),
        range_words=RANGE_WORDS.get(picker["range_key"])))


@login_required
def similar(request, project: str):
    project = _project(request, project)
    form = SimilarForm(request.GET or None, bounds=project_data_window(project=project))
    items, error = None, None
    if form.is_bound and form.is_valid() and (form.cleaned_data.get("text") or form.cleaned_data.get("span")):
        ranged = form.cleaned_data.get("range") or form.cleaned_data.get("start") or form.cleaned_data.get("end")
        start, end = form.window() if ranged else (None, None)
        filters = SpanFilters(start=start, end=end, service=form.cleaned_data.get("service"))
        try:
            items = search_similar(project_id=project.id, text=form.cleaned_data.get("text"),
                                   span_id=form.cleaned_data.get("span"), k=form.cleaned_data.get("k") or 10,
                                   filters=filters)
        except SearchError as exc:
            error = exc.message
    return render(request, "console/similar.html", _context(request, project, form=form, items=items, error=error))


def _key_form(request) -> KeyCreateForm:
    """A key form with a fresh one-time token, remembered in the session until used."""
    nonce = secrets.token_urlsafe(16)
    request.session[_KEY_NONCES] = [*request.session.get(_KEY_NONCES, []), nonce][-_KEY_NONCES_KEPT:]
    return KeyCreateForm(initial={"nonce": nonce})


def _settings_page(request, project, *, form=None, new_key: str | None = None, status: int = 200):
    response = render(request, "console/settings.html", _context(
        request, project, form=form or ProjectSettingsForm(instance=project), keys=project_keys(project=project),
        key_form=_key_form(request), new_key=new_key, config_refresh_seconds=settings.CONFIG_REFRESH_SECONDS),
        status=status)
    if new_key:
        add_never_cache_headers(response)  # not from the browser's cache either (back button)
    return response


@login_required
def settings_page(request, project: str):
    project = _project(request, project)
    form = None
    if request.method == "POST":
        form = ProjectSettingsForm(request.POST, instance=project)
        if form.is_valid():
            try:
                project_update_settings(project=project, **{k: form.cleaned_data[k] for k in form.Meta.fields})
            except ValidationError as exc:
                form.add_error(None, exc)
            else:
                messages.success(request, "Settings saved. Ingestion uses them within seconds.")
                return redirect("console:settings", project=project.name)
    return _settings_page(request, project, form=form)


@login_required
def key_create(request, project: str):
    """The new key is in this response only: it is never stored, not even in the session."""
    project = _project(request, project)
    if request.method != "POST":
        return redirect("console:settings", project=project.name)
    form = KeyCreateForm(request.POST)
    if not form.is_valid():
        messages.error(request, "A key needs a name of at most 100 characters.")
        return redirect("console:settings", project=project.name)
    nonces = request.session.get(_KEY_NONCES, [])
    if form.cleaned_data["nonce"] not in nonces:
        messages.error(request, "That key form was already sent (a page reload?), so no second key was made. "
                                "A key is shown only once: if you did not copy it, revoke it and create another.")
        return redirect("console:settings", project=project.name)
    request.session[_KEY_NONCES] = [n for n in nonces if n != form.cleaned_data["nonce"]]
    _, raw_key = api_key_create(project=project, name=form.cleaned_data["name"])
    return _settings_page(request, project, new_key=raw_key, status=201)


@login_required
@require_POST
def key_revoke(request, project: str, key_id: int):
    project = _project(request, project)
    api_key = project.api_keys.filter(pk=key_id).first()
    if api_key is None:
        raise Http404("no such key")
    api_key_revoke(api_key=api_key)
    messages.success(request, f"Key {api_key.prefix}… revoked: refused from now on by this process, and by the "
                              f"others within {settings.CONFIG_REFRESH_SECONDS} s (CONFIG_REFRESH_SECONDS).")
    return redirect("console:settings", project=project.name)


@login_required
def project_new(request):
    """Staff only. Project names are global (they are in every URL), so creating one under a name of
    one's choosing would tell whether a project the user cannot see has it; staff see every project.
    """
    if not request.user.is_staff:
        return render(request, "console/project_new.html", {"forbidden": True,
                                                            "projects": projects_for_user(user=request.user)},
                      status=403)
    form = ProjectCreateForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        project = project_create(name=form.cleaned_data["name"], owner=request.user)
        messages.success(request, f"Project {project.name} created. Make a key to send spans to it.")
        return redirect("console:settings", project=project.name)
    return render(request, "console/project_new.html", {"form": form,
                                                        "projects": projects_for_user(user=request.user)})
