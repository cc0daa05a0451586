"""Jumpstarter iSCSI target driver backed by uringtgt, a drop-in for jumpstarter_driver_iscsi."""
