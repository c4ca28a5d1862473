//! (being written: see the SLO/rollback issue)
