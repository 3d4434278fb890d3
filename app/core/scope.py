"""Which partners a caller may see and act on; services filter by it."""

from __future__ import annotations

import uuid
from dataclasses import dataclass


@dataclass(frozen=True)
class PartnerScope:
    """The partners visible to a caller: every partner (partner_ids None) or exactly these."""

    partner_ids: frozenset[uuid.UUID] | None

    @property
    def everything(self) -> bool:
        return self.partner_ids is None

    def allows(self, partner_id: uuid.UUID) -> bool:
        return self.partner_ids is None or partner_id in self.partner_ids


ALL_PARTNERS = PartnerScope(partner_ids=None)
"""Admins, and the system itself (the worker, the CLI)."""
