"""Console pages: presentation only, data comes from ingest selectors."""

from django.contrib.auth.decorators import login_required
from django.shortcuts import render

from ingest.selectors.projects import project_summaries


@login_required
def home(request):
    return render(request, "console/home.html", {
        "projects": project_summaries(user=request.user),
        "base_url": request.build_absolute_uri("/").rstrip("/"),
    })
