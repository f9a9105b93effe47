"""dispatchd: a self-hosted dispatch engine for businesses that run on WhatsApp."""

__version__ = "0.1.0"
