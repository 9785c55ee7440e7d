from django.contrib import admin
from django.urls import include, path

from appliance.api import api

urlpatterns = [
    path("admin/", admin.site.urls),
    path("", include("console.urls")),
    path("", api.urls),
]
