from django.contrib.auth import views as auth_views
from django.templatetags.static import static
from django.urls import path
from django.views.generic import RedirectView

from console import views
from console.throttle import ThrottledAuthenticationForm

app_name = "console"
urlpatterns = [
    path("", views.home, name="home"),
    path("favicon.ico", RedirectView.as_view(url=static("console/favicon.svg"), permanent=True)),
    path("login/", auth_views.LoginView.as_view(authentication_form=ThrottledAuthenticationForm), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("password/", auth_views.PasswordChangeView.as_view(success_url="/"), name="password_change"),
    path("projects/new/", views.project_new, name="project_new"),
    path("p/<slug:project>/", views.overview, name="overview"),
    path("p/<slug:project>/spans/", views.explorer, name="explorer"),
    # Span and trace ids are whatever clients sent ('/', '..', '?', ...): they travel in the query
    # string, where browsers leave them alone (they rewrite '.' and '..' path segments, even encoded).
    path("p/<slug:project>/span/", views.span_detail, name="span"),
    path("p/<slug:project>/trace/", views.trace, name="trace"),
    # The former URLs, with the id in the path, still work for bookmarks (`path` accepts '/').
    path("p/<slug:project>/spans/<path:span_id>/", views.span_by_path, name="span_by_path"),
    path("p/<slug:project>/traces/<path:trace_id>/", views.trace_by_path, name="trace_by_path"),
    path("p/<slug:project>/security/", views.security, name="security"),
    path("p/<slug:project>/similar/", views.similar, name="similar"),
    path("p/<slug:project>/settings/", views.settings_page, name="settings"),
    path("p/<slug:project>/settings/keys/", views.key_create, name="key_create"),
    path("p/<slug:project>/settings/keys/<int:key_id>/revoke/", views.key_revoke, name="key_revoke"),
]
