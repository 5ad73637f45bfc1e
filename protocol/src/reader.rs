//! A bounds-checked big-endian cursor over a frame. Offsets in errors are absolute positions
//! in the underlying buffer, so they point into the frame or datagram the caller holds.

use bytes::Bytes;

use crate::FrameError;

pub(crate) struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
    end: usize,
}

impl<'a> Reader<'a> {
    /// Reads `buf[start..end]`; `end` is clamped to the buffer.
    pub(crate) fn new(buf: &'a Bytes, start: usize, end: usize) -> Self {
        let end = end.min(buf.len());
        Reader {
            buf,
            pos: start.min(end),
            end,
        }
    }

    pub(crate) fn pos(&self) -> usize {
        self.pos
    }

    pub(crate) fn remaining(&self) -> usize {
        self.end - self.pos
    }

    #[inline]
    fn take<const N: usize>(&mut self) -> Result<[u8; N], FrameError> {
        let truncated = FrameError::Truncated { offset: self.pos };
        let stop = self.pos.checked_add(N).ok_or(truncated.clone())?;
        if stop > self.end {
            return Err(truncated);
        }
        let mut out = [0u8; N];
        out.copy_from_slice(self.buf.get(self.pos..stop).ok_or(truncated)?);
        self.pos = stop;
        Ok(out)
    }

    #[inline]
    pub(crate) fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take::<1>()?[0])
    }

    #[inline]
    pub(crate) fn u16(&mut self) -> Result<u16, FrameError> {
        self.take().map(u16::from_be_bytes)
    }

    #[inline]
    pub(crate) fn u32(&mut self) -> Result<u32, FrameError> {
        self.take().map(u32::from_be_bytes)
    }

    #[inline]
    pub(crate) fn u64(&mut self) -> Result<u64, FrameError> {
        self.take().map(u64::from_be_bytes)
    }

    #[inline]
    pub(crate) fn i16(&mut self) -> Result<i16, FrameError> {
        self.take().map(i16::from_be_bytes)
    }

    #[inline]
    pub(crate) fn i32(&mut self) -> Result<i32, FrameError> {
        self.take().map(i32::from_be_bytes)
    }

    /// The next `n` bytes as a zero-copy slice of the frame.
    pub(crate) fn bytes(&mut self, n: usize) -> Result<Bytes, FrameError> {
        let stop = self
            .pos
            .checked_add(n)
            .filter(|&s| s <= self.end)
            .ok_or(FrameError::Truncated { offset: self.pos })?;
        let out = self.buf.slice(self.pos..stop);
        self.pos = stop;
        Ok(out)
    }

    /// The next `n` bytes, borrowed.
    pub(crate) fn slice(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        let stop = self
            .pos
            .checked_add(n)
            .filter(|&s| s <= self.end)
            .ok_or(FrameError::Truncated { offset: self.pos })?;
        let out = self
            .buf
            .get(self.pos..stop)
            .ok_or(FrameError::Truncated { offset: self.pos })?;
        self.pos = stop;
        Ok(out)
    }

    /// Fails unless every byte up to the end was read.
    pub(crate) fn finish(&self) -> Result<(), FrameError> {
        if self.pos == self.end {
            Ok(())
        } else {
            Err(FrameError::TrailingBytes { offset: self.pos })
        }
    }
}
