from django.contrib import admin, messages

from ingest.models import ApiKey, DetectionPattern, ModelPrice, Project
from ingest.services.api_keys import api_key_create, api_key_revoke


class ApiKeyInline(admin.TabularInline):
    model = ApiKey
    extra = 0
    fields = ("name", "prefix", "created_at", "last_used_at", "revoked_at")
    readonly_fields = ("name", "prefix", "created_at", "last_used_at", "revoked_at")
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request, obj=None):
        return False  # keys are made on the API key page, where the key is shown once


@admin.register(Project)
class ProjectAdmin(admin.ModelAdmin):
    list_display = ("name", "created_at", "sampling_rate")
    search_fields = ("name",)
    filter_horizontal = ("members",)
    inlines = [ApiKeyInline]


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ("prefix", "project", "name", "created_at", "last_used_at", "revoked_at")
    list_filter = ("project", ("revoked_at", admin.EmptyFieldListFilter))
    search_fields = ("prefix", "name", "project__name")
    readonly_fields = ("prefix", "created_at", "last_used_at")
    fields = ("project", "name", "prefix", "created_at", "last_used_at", "revoked_at")
    actions = ["revoke"]

    def save_model(self, request, obj, form, change):
        if change:
            super().save_model(request, obj, form, change)
            return
        created, raw_key = api_key_create(project=obj.project, name=obj.name)
        obj.pk, obj.prefix, obj.key_hash, obj.created_at = created.pk, created.prefix, created.key_hash, created.created_at
        messages.warning(request, f"New API key for {obj.project.name} (copy it now, it is not shown again): {raw_key}")

    @admin.action(description="Revoke selected keys")
    def revoke(self, request, queryset):
        for api_key in queryset.filter(revoked_at__isnull=True):
            api_key_revoke(api_key=api_key)
        self.message_user(request, "Revoked.")


@admin.register(ModelPrice)
class ModelPriceAdmin(admin.ModelAdmin):
    list_display = ("provider", "model", "input_price_per_1m", "output_price_per_1m", "cached_input_price_per_1m",
                    "version", "source", "updated_at")
    list_filter = ("provider", "source", "version")
    search_fields = ("model", "provider")

    def save_model(self, request, obj, form, change):
        obj.source = ModelPrice.Source.ADMIN  # a later config load must not overwrite this edit
        super().save_model(request, obj, form, change)


@admin.register(DetectionPattern)
class DetectionPatternAdmin(admin.ModelAdmin):
    list_display = ("name", "type", "enabled", "placeholder", "source", "updated_at")
    list_filter = ("type", "enabled", "source")
    search_fields = ("name", "regex", "description")

    def save_model(self, request, obj, form, change):
        obj.source = ModelPrice.Source.ADMIN
        super().save_model(request, obj, form, change)


admin.site.site_header = "llm-observe administration"
admin.site.site_title = "llm-observe"
