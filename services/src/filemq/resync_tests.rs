//! RESYNCs walked off the loop: the same outcome as inline, under change.

use super::*;
