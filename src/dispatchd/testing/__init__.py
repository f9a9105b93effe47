"""Test doubles shipped with the package: a fake WhatsApp Cloud API (``dispatchd fake-whatsapp``)."""
