"""Kept for ``python -m bench.fake_whatsapp``: the fake WhatsApp Cloud API now lives in the package,
:mod:`dispatchd.testing.fake_whatsapp` (also ``dispatchd fake-whatsapp``); same options and routes."""

from __future__ import annotations

from dispatchd.testing.fake_whatsapp import ERROR_BODY, FakeWhatsApp, main

__all__ = ["ERROR_BODY", "FakeWhatsApp", "main"]

if __name__ == "__main__":
    main()
