//! A small column-oriented table that writes and reads Parquet, so every stage writes its
//! tables (index, class pixels, scores, metrics, logs) the same way, readable by DuckDB, pandas
//! and polars.
//!
//! ```no_run
//! use dag_data::{Column, Table};
//! let t = Table::new()
//!     .with("image_id", Column::U32(vec![0, 1]))
//!     .with("score", Column::F64(vec![0.25, 0.5]));
//! t.write_parquet(std::path::Path::new("scores.parquet")).unwrap();
//! ```

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow_array::{
    Array, ArrayRef, BooleanArray, Float32Array, Float64Array, Int32Array, Int64Array, RecordBatch,
    StringArray, UInt32Array, UInt64Array, UInt8Array,
};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

use crate::DataError;

/// One column's values (no nulls; use NaN for a missing float).
#[derive(Debug, Clone, PartialEq)]
pub enum Column {
    U8(Vec<u8>),
    U32(Vec<u32>),
    U64(Vec<u64>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bool(Vec<bool>),
    Str(Vec<String>),
}

impl Column {
    /// Number of rows.
    pub fn len(&self) -> usize {
        match self {
            Column::U8(v) => v.len(),
            Column::U32(v) => v.len(),
            Column::U64(v) => v.len(),
            Column::I32(v) => v.len(),
            Column::I64(v) => v.len(),
            Column::F32(v) => v.len(),
            Column::F64(v) => v.len(),
            Column::Bool(v) => v.len(),
            Column::Str(v) => v.len(),
        }
    }

    /// Whether the column has no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn to_arrow(&self) -> ArrayRef {
        match self {
            Column::U8(v) => Arc::new(UInt8Array::from(v.clone())),
            Column::U32(v) => Arc::new(UInt32Array::from(v.clone())),
            Column::U64(v) => Arc::new(UInt64Array::from(v.clone())),
            Column::I32(v) => Arc::new(Int32Array::from(v.clone())),
            Column::I64(v) => Arc::new(Int64Array::from(v.clone())),
            Column::F32(v) => Arc::new(Float32Array::from(v.clone())),
            Column::F64(v) => Arc::new(Float64Array::from(v.clone())),
            Column::Bool(v) => Arc::new(BooleanArray::from(v.clone())),
            Column::Str(v) => Arc::new(StringArray::from_iter_values(v)),
        }
    }

    fn empty_like(dt: &DataType) -> Option<Column> {
        Some(match dt {
            DataType::UInt8 => Column::U8(vec![]),
            DataType::UInt32 => Column::U32(vec![]),
            DataType::UInt64 => Column::U64(vec![]),
            DataType::Int32 => Column::I32(vec![]),
            DataType::Int64 => Column::I64(vec![]),
            DataType::Float32 => Column::F32(vec![]),
            DataType::Float64 => Column::F64(vec![]),
            DataType::Boolean => Column::Bool(vec![]),
            DataType::Utf8 => Column::Str(vec![]),
            _ => return None,
        })
    }

    /// Appends the values of an Arrow array of the same type; `false` if it holds nulls.
    fn extend_from(&mut self, a: &dyn Array) -> bool {
        if a.null_count() > 0 {
            return false;
        }
        macro_rules! ext {
            ($v:expr, $ty:ty) => {
                match a.as_any().downcast_ref::<$ty>() {
                    Some(arr) => {
                        $v.extend(arr.values().iter().copied());
                        true
                    }
                    None => false,
                }
            };
        }
        match self {
            Column::U8(v) => ext!(v, UInt8Array),
            Column::U32(v) => ext!(v, UInt32Array),
            Column::U64(v) => ext!(v, UInt64Array),
            Column::I32(v) => ext!(v, Int32Array),
            Column::I64(v) => ext!(v, Int64Array),
            Column::F32(v) => ext!(v, Float32Array),
            Column::F64(v) => ext!(v, Float64Array),
            Column::Bool(v) => match a.as_any().downcast_ref::<BooleanArray>() {
                Some(arr) => {
                    v.extend(arr.values().iter());
                    true
                }
                None => false,
            },
            Column::Str(v) => match a.as_any().downcast_ref::<StringArray>() {
                Some(arr) => {
                    v.extend(arr.iter().map(|s| s.unwrap_or_default().to_string()));
                    true
                }
                None => false,
            },
        }
    }
}

/// Named columns of equal length.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Table {
    columns: Vec<(String, Column)>,
}

impl Table {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a column (builder style).
    pub fn with(mut self, name: impl Into<String>, column: Column) -> Self {
        self.push(name, column);
        self
    }

    /// Adds a column.
    pub fn push(&mut self, name: impl Into<String>, column: Column) {
        self.columns.push((name.into(), column));
    }

    /// Number of rows (0 for a table without columns).
    pub fn num_rows(&self) -> usize {
        self.columns.first().map_or(0, |(_, c)| c.len())
    }

    /// The column called `name`.
    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|(n, _)| n == name).map(|(_, c)| c)
    }

    /// Column names, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.columns.iter().map(|(n, _)| n.as_str())
    }

    fn err(path: &Path, reason: impl std::fmt::Display) -> DataError {
        DataError::Table {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        }
    }

    /// Writes the table as one snappy-compressed Parquet row group.
    pub fn write_parquet(&self, path: &Path) -> Result<(), DataError> {
        let rows = self.num_rows();
        if let Some((name, c)) = self.columns.iter().find(|(_, c)| c.len() != rows) {
            return Err(Self::err(
                path,
                format!("column `{name}` has {} rows, expected {rows}", c.len()),
            ));
        }
        let fields: Vec<Field> = self
            .columns
            .iter()
            .map(|(name, c)| Field::new(name, c.to_arrow().data_type().clone(), false))
            .collect();
        let schema = Arc::new(Schema::new(fields));
        let arrays: Vec<ArrayRef> = self.columns.iter().map(|(_, c)| c.to_arrow()).collect();
        let batch = if arrays.is_empty() {
            RecordBatch::new_empty(schema.clone())
        } else {
            RecordBatch::try_new(schema.clone(), arrays).map_err(|e| Self::err(path, e))?
        };
        let file = File::create(path).map_err(|e| DataError::io(path, e))?;
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build();
        let mut writer =
            ArrowWriter::try_new(file, schema, Some(props)).map_err(|e| Self::err(path, e))?;
        writer.write(&batch).map_err(|e| Self::err(path, e))?;
        writer.close().map_err(|e| Self::err(path, e))?;
        Ok(())
    }

    /// Reads a Parquet file whose columns all have types that [`Column`] can hold, without
    /// nulls.
    pub fn read_parquet(path: &Path) -> Result<Table, DataError> {
        let file = File::open(path).map_err(|e| DataError::io(path, e))?;
        let builder =
            ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| Self::err(path, e))?;
        let schema = builder.schema().clone();
        let mut columns = Vec::new();
        for f in schema.fields() {
            let col = Column::empty_like(f.data_type()).ok_or_else(|| {
                Self::err(
                    path,
                    format!(
                        "column `{}` has unsupported type {}",
                        f.name(),
                        f.data_type()
                    ),
                )
            })?;
            columns.push((f.name().clone(), col));
        }
        let reader = builder.build().map_err(|e| Self::err(path, e))?;
        for batch in reader {
            let batch = batch.map_err(|e| Self::err(path, e))?;
            for (i, (name, col)) in columns.iter_mut().enumerate() {
                if !col.extend_from(batch.column(i).as_ref()) {
                    return Err(Self::err(path, format!("column `{name}` holds nulls")));
                }
            }
        }
        Ok(Table { columns })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_column_type() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.parquet");
        let t = Table::new()
            .with("a", Column::U8(vec![1, 255]))
            .with("b", Column::U32(vec![7, 8]))
            .with("c", Column::U64(vec![u64::MAX, 0]))
            .with("d", Column::I32(vec![-1, 2]))
            .with("e", Column::I64(vec![-5, 6]))
            .with("f", Column::F32(vec![0.5, f32::NAN]))
            .with("g", Column::F64(vec![1.25, -2.0]))
            .with("h", Column::Bool(vec![true, false]))
            .with("i", Column::Str(vec!["x".into(), "é/ü".into()]));
        t.write_parquet(&path).unwrap();
        let back = Table::read_parquet(&path).unwrap();
        assert_eq!(back.num_rows(), 2);
        assert_eq!(
            back.names().collect::<Vec<_>>(),
            t.names().collect::<Vec<_>>()
        );
        for name in ["a", "b", "c", "d", "e", "g", "h", "i"] {
            assert_eq!(back.column(name), t.column(name), "column {name}");
        }
        match back.column("f") {
            Some(Column::F32(v)) => assert!(v[0] == 0.5 && v[1].is_nan()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn refuses_ragged_columns() {
        let dir = tempfile::tempdir().unwrap();
        let t = Table::new()
            .with("a", Column::U8(vec![1]))
            .with("b", Column::U8(vec![]));
        let e = t.write_parquet(&dir.path().join("t.parquet")).unwrap_err();
        assert!(e.to_string().contains("column `b` has 0 rows"), "{e}");
    }
}
